"""excise.processes: the allocator setting the CLI applies, and its opt-outs."""

from __future__ import annotations

import platform
import sys

import pytest

from excise.processes import is_main_process, tune_allocator, world_size


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_allocator_applies_on_glibc(monkeypatch):
    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("EXCISE_TUNE_MALLOC", raising=False)
    assert tune_allocator() is True


@pytest.mark.parametrize("env", [{"EXCISE_TUNE_MALLOC": "0"}, {"MALLOC_ARENA_MAX": "2"}])
def test_tune_allocator_leaves_the_users_settings(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert tune_allocator() is False


def test_single_process_is_main(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1 and is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert world_size() == 2 and not is_main_process()
