"""The README's quick tour runs as written (on the real embedded SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_quick_tour_runs(tmp_path, monkeypatch, one_thread):
    text = README.read_text(encoding="utf-8")
    tour = text[text.index("## Quick tour"):]
    code = re.search(r"```python\n(.*?)```", tour, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)  # scales.save("my_model_dir") writes here
    ns: dict = {}
    exec(compile(code, "README.md (quick tour)", "exec"), ns)
    assert ns["pruned"] is not ns["h"] and ns["scores"].kind == "head"
