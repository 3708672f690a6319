"""Kill anywhere, resume, same bytes: 20 seeded-random SIGKILLs across three workflows.

* `excise bbq eval` (prediction kept in chunks, excise.resume): 8 kill points, one of them through the real
  entry point (`python -m excise.cli`);
* the `undo` recipe: 8 kill points, half in its unlearning training loops (checkpoints every 2 steps,
  each finished method kept), half in its relearning sweep (each finished (model, learning rate) kept);
* `excise bbq mitigate`: 4 kill points in its LoRA fine-tune (``finetune.checkpoint_every=2``).

Each kill point: run the command, the process kills itself with SIGKILL at its n-th kill point
(``EXCISE_TEST_KILL_AFTER``; :func:`excise.resume.kill_point` marks finished stages, chunks, sweep points,
checkpoints and training steps), run the same command again to completion, and compare with an
uninterrupted reference run. The reference logs every kill point (``EXCISE_TEST_KILL_LOG``) and the kill
points are drawn from that log with a fixed seed, so the test is deterministic, not a race with a timer.

The runs are forked children of this test process (torch already imported: a second per run instead of
about nine for a fresh interpreter); a SIGKILL ends the child exactly as it ends a CLI process.

Compared (tests/digests.py): every file of the run directory byte for byte, except ``run.json``,
``stage.json`` and ``report.html`` (dates, timings, the directory's name); JSON, JSONL and CSV files with
their timing fields (keys ending in ``seconds`` or ``per_second``) left out. No ``.tmp`` and no
``.checkpoints`` may be left behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml
from digests import differ, tree


pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 16


def _fork(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Run the CLI in a forked child; its exit code, or -9 when it killed itself."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ.update(env)
            sys.stdout = sys.stderr = open(log, "a", encoding="utf-8")
            from excise.cli import main

            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
            finally:
                os._exit(code)
    deadline = time.time() + 600
    while time.time() < deadline:  # a child that hangs fails the test instead of stalling the suite
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"{argv} did not finish in 600 s")


def _subprocess(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Run the CLI through the real entry point (a fresh interpreter)."""
    full = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    with open(log, "a", encoding="utf-8") as f:
        return subprocess.run([sys.executable, "-m", "excise.cli", *argv], env=full, stdout=f, stderr=f,
                              timeout=600).returncode


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny llama, a small BBQ subset, the tiny `undo` recipe and its pretrained models (cached in the workspace)."""
    from tqdm import tqdm

    from excise.organisms.arithmetic import pretrain
    from excise.recipes.robust_config import RobustUnlearnConfig
    from excise.tasks.arithmetic import RETAIN_OPS
    from excise.tasks.bbq import packaged_bbq_dir
    from excise.testing import save_tiny

    tqdm.monitor_interval = 0  # no tqdm monitor thread: forked children must not inherit a held lock
    w = tmp_path_factory.mktemp("kill")
    save_tiny("llama", w / "tiny")
    (w / "bbq").mkdir()
    for cat in ("Age", "SES"):
        lines = (packaged_bbq_dir() / f"{cat}.jsonl").read_text(encoding="utf-8").splitlines()
        (w / "bbq" / f"{cat}.jsonl").write_text(
            "\n".join(x for i in range(0, len(lines), 100) for x in lines[i:i + 8]) + "\n", encoding="utf-8")
    recipe = {
        "workflow": "undo", "seeds": [0], "num_threads": 1, "checkpoint_every": 2, "targeted": [],
        "pretrain": {"arch": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64}, "steps": 30, "batch_size": 8,
                     "eval_n_per_op": 4, "log_every": 0},
        "methods": {m: {"method": m, "steps": 6, "batch_size": 4} for m in ("grad_diff", "npo")}, "undo_from": "npo",
        "alphas": [0.5], "localize_n": 8, "eval_n_per_op": 4,
        "distill": {"max_steps": 2, "eval_every": 1, "eval_n_per_op": 4, "batch_size": 4},
        "relearn": {"lrs": [0.001, 0.01], "steps": 4, "eval_every": 2, "batch_size": 4, "n_items": 8,
                    "eval_n_per_op": 2},
    }
    (w / "undo.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.MonkeyPatch.context() as mp:  # the recipe's base and oracle, pretrained as the workflow does
        mp.setenv("EXCISE_CACHE", str(w / "cache"))
        pc = RobustUnlearnConfig(**{k: v for k, v in recipe.items() if k != "workflow"}).pretrain
        pretrain(pc, name="base")
        pretrain(pc.model_copy(update={"ops": list(RETAIN_OPS)}), name="oracle")
    return w


def _commands(w: Path) -> dict[str, list[str]]:
    return {
        "eval": ["bbq", "eval", "--model", str(w / "tiny"), "--data-dir", str(w / "bbq"), "--categories", "Age,SES",
                 "--per-category", "32", "--batch-size", "1", "--n-boot", "20", "--seed", "3"],
        "undo": ["run", str(w / "undo.yaml")],
        "mitigate": ["bbq", "mitigate", "--model", str(w / "tiny"), "--categories", "Age", "--steps", "4",
                     "--per-category", "8", "--set", f"data_dir={w / 'bbq'}", "--set", "finetune.checkpoint_every=2",
                     "--set", "finetune.batch_size=2"],
    }


# per workflow: (kill-point tags to draw from, how many kill points)
PLAN = {
    "eval": [("", 8)],
    "undo": [("seed0-unlearn|unlearn ", 4), ("seed0-relearn|relearn", 4)],
    "mitigate": [("train:finetune|stage:mitigate", 4)],
}


def _events(log: Path) -> list[tuple[int, str]]:
    return [(int(k), tag) for k, tag in (line.split(" ", 1) for line in log.read_text().splitlines())]


def _draw(events: list[tuple[int, str]], plan: list[tuple[str, int]], rng: random.Random) -> list[int]:
    """Kill points (their numbers in the reference's log) drawn for each group of tags."""
    out: list[int] = []
    for tags, n in plan:
        pool = [k for k, tag in events if not tags or any(t in tag for t in tags.split("|"))]
        assert len(pool) >= n, (tags, events)
        out += sorted(rng.sample(pool, n))
    return out


def _start_from(ref: Path, dst: Path, events: list[tuple[int, str]], k: int) -> int:
    """Copy the reference's stages finished before kill point ``k`` into ``dst`` (a run resumed after them);
    the kill point's number counted from there."""
    done = [(i, tag.split(":", 1)[1]) for i, tag in events if tag.startswith("stage:") and i < k]
    if not done:
        return k
    dst.mkdir()
    for f in ("config.json", "run.json"):
        shutil.copy2(ref / f, dst / f)
    for _, name in done:
        shutil.copytree(ref / name, dst / name)
    return k - done[-1][0]


@pytest.mark.parametrize("workflow", list(PLAN))
def test_killed_anywhere_and_resumed_gives_the_same_bytes(ws, workflow, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(ws / "cache"))
    argv = _commands(ws)[workflow]
    log = tmp_path / "ref.log"
    assert _fork(argv + ["--out", str(tmp_path / "ref")], {"EXCISE_TEST_KILL_LOG": str(tmp_path / "events")},
                 log) == 0, log.read_text()[-3000:]
    ref = tree(tmp_path / "ref")
    events = _events(tmp_path / "events")
    kills = _draw(events, PLAN[workflow], random.Random(f"{SEED}-{workflow}"))
    results = []
    for i, k in enumerate(kills):
        out, log = tmp_path / f"k{i}", tmp_path / f"k{i}.log"
        after = _start_from(tmp_path / "ref", out, events, k)
        launch = _subprocess if workflow == "eval" and i == 0 else _fork  # one kill through the real entry point
        killed = launch(argv + ["--out", str(out)], {"EXCISE_TEST_KILL_AFTER": str(after)}, log)
        resumed = _fork(argv + ["--out", str(out)], {}, log)
        results.append((k, killed, resumed, differ(tree(out), ref) if resumed == 0 else "not resumed"))
    bad = [r for r in results if r[1] != -9 or r[2] != 0 or r[3]]
    assert not bad, (bad, [(tmp_path / f"k{i}.log").read_text()[-2000:] for i in range(len(kills))])
    print(f"{workflow}: {len(results)} kill points {kills} of {len(events)}, all resumed to identical results")
