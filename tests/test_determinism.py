"""Same command twice on CPU at tiny scale -> byte-identical results, for every workflow.

Each workflow runs twice through the CLI (in-process) with the same seed, in two output directories
(and, where it builds a model into the excise cache -- the UNDO base and oracle, the caption organism --
two caches, so building is checked too), and every result file is compared (tests/digests.py): byte for
byte, except that ``run.json``, ``stage.json``, ``timings.json`` and ``report.html`` are left out (dates,
timings, the directory's name) and JSON, JSONL and CSV files are compared with their timing fields (keys
ending in ``seconds`` or ``per_second``, ``created``) removed and the run's own directory (and cache)
replaced by a placeholder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from digests import differ, tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _main(argv: list[str]) -> int:
    from excise.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from excise.tasks.bbq import packaged_bbq_dir
    from excise.testing import save_tiny

    d = tmp_path_factory.mktemp("det")
    save_tiny("llama", d / "model")
    save_tiny("bert", d / "bert")
    (d / "bbq").mkdir()
    lines = (packaged_bbq_dir() / "Age.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "bbq" / "Age.jsonl").write_text("\n".join(x for i in range(0, len(lines), 100) for x in lines[i:i + 8]) + "\n")
    return d


def _twice(tmp_path: Path, monkeypatch, argv: list[str], *, own_cache: bool = False) -> None:
    """Run ``argv + --out <a|b>`` twice (each with its own excise cache if asked) and compare the results."""
    trees = []
    for run in ("a", "b"):
        cache = tmp_path / (f"cache_{run}" if own_cache else "cache")
        monkeypatch.setenv("EXCISE_CACHE", str(cache))
        assert _main(argv + ["--out", str(tmp_path / run)]) == 0
        trees.append(tree(tmp_path / run, {"cache": cache}))
    assert not differ(*trees), differ(*trees)


def _recipe(tmp_path: Path, settings: dict) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(settings))
    return str(p)


def test_bbq_eval_and_score_twice_are_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    _twice(tmp_path, monkeypatch, ["bbq", "eval", "--model", str(tiny / "model"), "--data-dir", str(tiny / "bbq"),
                                   "--categories", "Age", "--per-category", "8", "--n-boot", "50", "--seed", "3"])
    for run in ("a", "b"):
        assert _main(["bbq", "score", str(tmp_path / run / "predict" / "predictions.jsonl"), "--n-boot", "50",
                      "--out", str(tmp_path / f"score_{run}")]) == 0
    capsys.readouterr()
    assert not differ(tree(tmp_path / "score_a"), tree(tmp_path / "score_b"))


def test_undo_unlearn_twice_is_byte_identical(tiny, tmp_path, capsys):
    for run in ("a", "b"):
        assert _main(["undo", "unlearn", "--model", str(tiny / "model"), "--out", str(tmp_path / run), "--steps", "3",
                      "--method", "grad_diff", "--eval-n", "2", "--seed", "5"]) == 0
    capsys.readouterr()
    assert not differ(tree(tmp_path / "a"), tree(tmp_path / "b"))


def test_bbq_run_twice_is_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    """Evaluate, localize, soft-prune + LoRA, re-evaluate, report."""
    _twice(tmp_path, monkeypatch, [
        "bbq", "run", "--model", str(tiny / "model"), "--categories", "Age", "--per-category", "8",
        "--pairs-per-category", "6", "--steps", "2", "--seed", "2", "--set", f"data_dir={tiny / 'bbq'}",
        "--set", "finetune.batch_size=2", "--set", "trace_items=2", "--set", "n_boot=100",
        "--set", "localize.n_candidates=2"])
    capsys.readouterr()


def test_undo_recipe_twice_is_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    """Pretraining (into two caches), every unlearning method, UNDO, the relearning sweep, the report."""
    recipe = _recipe(tmp_path, {
        "workflow": "undo", "seeds": [1], "num_threads": 1, "targeted": [{"localizer": "paramdiff"}],
        "pretrain": {"arch": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64}, "steps": 4, "batch_size": 8,
                     "eval_n_per_op": 4, "log_every": 0},
        "methods": {m: {"method": m, "steps": 2, "batch_size": 4} for m in ("grad_diff", "maxent", "rmu")},
        "alphas": [0.5], "localize_n": 8, "eval_n_per_op": 4,
        "distill": {"max_steps": 2, "eval_every": 1, "eval_n_per_op": 4, "batch_size": 4},
        "relearn": {"lrs": [0.001, 0.01], "steps": 2, "eval_every": 1, "batch_size": 4, "n_items": 8,
                    "eval_n_per_op": 2}})
    _twice(tmp_path, monkeypatch, ["run", recipe], own_cache=True)
    capsys.readouterr()


def test_concept_recipe_twice_is_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    """Screen, before, localize (saliency), masked-LoRA unlearning, after, report (the quick variant)."""
    recipe = _recipe(tmp_path, {"workflow": "concept", "model": str(tiny / "model"), "threads": 1, "screen": False,
                                "max_new_tokens": 4, "select": {"method": "topk", "k": 16, "per_layer": False},
                                "unlearn": {"steps": 2}, "seed": 4})
    _twice(tmp_path, monkeypatch, ["run", recipe, "--quick"])
    capsys.readouterr()


def test_fair_recipe_twice_is_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    """Data, frozen baselines, plain and fair LoRA (checkpoint selection, calibration, export), report."""
    recipe = _recipe(tmp_path, {
        "workflow": "fair", "model": str(tiny / "bert"), "train_limit": 64, "val_limit": 32, "cap_per_class": 40,
        "n_boot": 20, "plain": {"epochs": 1, "patience": 0, "batch_size": 16, "max_length": 32},
        "fair": {"epochs": 2, "patience": 0, "batch_size": 16, "max_length": 32, "lambda_adv": 1.0, "lambda_eo": 1.0},
        "baselines": {"eg_eps": [0.05]}})
    _twice(tmp_path, monkeypatch, ["run", recipe])
    capsys.readouterr()


def test_captions_recipe_twice_is_byte_identical(tmp_path, monkeypatch, capsys):
    """The caption organism (built into two caches), extraction, SAE, locate, LoRA and SAE edits, report."""
    recipe = _recipe(tmp_path, {
        "workflow": "captions", "threads": 1, "organism": {"n_scenes": 64, "steps": 4, "batch_size": 16},
        "n_eval": 16, "n_locate": 24, "n_mitigate": 16, "n_patch": 4, "n_boot": 200,
        "mitigate": {"train": {"steps": 3}}, "sae": {"sae": {"epochs": 1}}})
    _twice(tmp_path, monkeypatch, ["run", recipe], own_cache=True)
    capsys.readouterr()
