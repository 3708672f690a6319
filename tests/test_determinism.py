"""Same command twice on CPU at tiny scale -> byte-identical results (timings aside)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _main(argv: list[str]) -> int:
    from excise.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def _digests(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name in names)
    assert files, f"no results under {root}"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from excise.tasks.bbq import packaged_bbq_dir
    from excise.testing import save_tiny

    d = tmp_path_factory.mktemp("det")
    save_tiny("llama", d / "model")
    (d / "bbq").mkdir()
    lines = (packaged_bbq_dir() / "Age.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "bbq" / "Age.jsonl").write_text("\n".join(lines[i] for i in range(0, len(lines), 60)) + "\n")
    return d


RESULTS = ("predictions.jsonl", "bias_scores.json", "bias_scores.csv", "items.jsonl", "matched_predictions.jsonl",
           "match_counts.json", "model.safetensors", "excise_undo.json")


def test_bbq_eval_and_score_twice_are_byte_identical(tiny, tmp_path, capsys):
    for run in ("a", "b"):
        assert _main(["bbq", "eval", "--model", str(tiny / "model"), "--data-dir", str(tiny / "bbq"), "--categories",
                      "Age", "--per-category", "8", "--n-boot", "50", "--seed", "3", "--out", str(tmp_path / run)]) == 0
        assert _main(["bbq", "score", str(tmp_path / run / "predict" / "predictions.jsonl"), "--n-boot", "50",
                      "--out", str(tmp_path / f"score_{run}")]) == 0
    capsys.readouterr()
    assert _digests(tmp_path / "a", RESULTS) == _digests(tmp_path / "b", RESULTS)
    assert _digests(tmp_path / "score_a", RESULTS) == _digests(tmp_path / "score_b", RESULTS)


def test_undo_unlearn_twice_is_byte_identical(tiny, tmp_path, capsys):
    for run in ("a", "b"):
        assert _main(["undo", "unlearn", "--model", str(tiny / "model"), "--out", str(tmp_path / run), "--steps", "3",
                      "--method", "grad_diff", "--eval-n", "2", "--seed", "5"]) == 0
    capsys.readouterr()
    assert _digests(tmp_path / "a", RESULTS) == _digests(tmp_path / "b", RESULTS)
