"""The `undo` workflow end to end on a minuscule configuration, and its CLI."""

import json

import pytest
import yaml

from excise.intervene.unlearn_methods import METHODS


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {
    "workflow": "undo",
    "seeds": [0],
    "num_threads": 1,
    "pretrain": {"arch": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64}, "steps": 4, "batch_size": 8,
                 "eval_n_per_op": 4, "log_every": 0},
    "methods": {m: {"method": m, "steps": 2, "batch_size": 4} for m in METHODS},
    "alphas": [0.5],
    "snmf": {"k": 4, "iters": 5, "n_forget_features": 2},
    "localize_n": 8,
    "distill": {"max_steps": 2, "eval_every": 1, "eval_n_per_op": 4, "batch_size": 4},
    "relearn": {"lrs": [0.001], "steps": 2, "eval_every": 1, "batch_size": 4, "n_items": 8, "eval_n_per_op": 2},
    "eval_n_per_op": 4,
}


def test_recipe_end_to_end_writes_table_and_plot(tmp_path, monkeypatch):
    from excise.recipes.loader import run_recipe_file

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    res = run_recipe_file(recipe, out=out)
    rep = out / "report"
    for f in ("comparison.csv", "comparison.md", "comparison.json", "tradeoff.png", "relearn_curves.png",
              "distill_accuracy.png"):  # distill_loss.png too when any variant trained (here all may stop at step 0)
        assert (rep / f).exists(), f
    md = (rep / "comparison.md").read_text()
    assert "retain after noise" in md and "## Distillation curves" in md
    data = json.loads((rep / "comparison.json").read_text())
    names = {r["model"] for r in data["rows"]}
    assert {"base", "oracle", *METHODS, "undo-global-a0.5", "undo-paramdiff-binary-a0.8", "undo-snmf-a0.8",
            "undo-fisher-binary-a0.8"} <= names
    assert data["verdict"]["answer"] in ("yes", "no")
    undo = json.loads((out / "seed0-undo" / "metrics.json").read_text())
    assert all(v["distill_flops"] >= 0 for v in undo.values())
    assert undo["undo-snmf-a0.8"]["noise"]["covered_fraction"] < 0.2
    assert all({"loss", "retain", "forget"} <= set(v["distill_curve"][-1]) for v in undo.values())
    unl = json.loads((out / "seed0-unlearn" / "metrics.json").read_text())
    assert unl["rmu"]["rmu_c"] == pytest.approx(5.0 * unl["rmu"]["rmu_resid_norm"])
    rel = json.loads((out / "seed0-relearn" / "metrics.json").read_text())
    assert all(v["attack_ops"] == ["div", "mul"] for v in rel.values())
    # a re-run resumes: every stage is skipped, the result is the same
    res2 = run_recipe_file(recipe, out=out)
    assert res2["metrics"]["verdict"] == res["metrics"]["verdict"]


def test_cli_undo_help_and_bad_input(tmp_path, capsys):
    from excise.cli import main

    with pytest.raises(SystemExit) as e:
        main(["undo", "--help"])
    assert e.value.code == 0
    assert "relearn" in capsys.readouterr().out
    bad = tmp_path / "forget.jsonl"
    bad.write_text('{"prompt": "3 * 4 = ", "answer": "twelve"}\n')
    with pytest.raises(SystemExit) as e:
        main(["undo", "relearn", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--lrs", "fast"])
    assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["undo", "unlearn", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["undo", "unlearn", "--model", "x", "--out", str(tmp_path / "o"), "--method", "forgetful"])
    assert e.value.code == 2


def test_stages_accept_a_hugging_face_decoder_and_data_files(tmp_path):
    from excise.cli import main
    from excise.tasks.arithmetic import FORGET_OPS, RETAIN_OPS, train_items
    from excise.testing import save_tiny

    model = save_tiny("llama", tmp_path / "hf")
    f, r = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    f.write_text("".join(json.dumps(it.as_dict()) + "\n" for it in train_items(FORGET_OPS, 12, 0)))
    r.write_text("".join(json.dumps(it.as_dict()) + "\n" for it in train_items(RETAIN_OPS, 12, 0)))

    def ok(args):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code in (0, None), args

    unl = tmp_path / "unl"
    ok(["undo", "unlearn", "--model", str(model), "--method", "grad_diff", "--steps", "2", "--forget-file", str(f),
        "--retain-file", str(r), "--eval-n", "2", "--out", str(unl)])
    assert (unl / "model.safetensors").exists() and (unl / "excise_undo.json").exists()
    noised = tmp_path / "noised"
    ok(["undo", "noise", "--model", str(unl), "--base", str(model), "--mask-from", "paramdiff", "--out", str(noised)])
    ok(["undo", "distill", "--teacher", str(unl), "--student", str(noised), "--max-steps", "2", "--forget-file", str(f),
        "--retain-file", str(r), "--eval-n", "2", "--out", str(tmp_path / "dist")])
    ok(["undo", "relearn", "--model", str(tmp_path / "dist"), "--steps", "2", "--lrs", "0.001", "--forget-file", str(f),
        "--eval-n", "2", "--out", str(tmp_path / "att")])
    res = json.loads((tmp_path / "att" / "relearn.json").read_text())
    assert res["attack_ops"] == ["div", "mul"] and len(res["per_lr"]) == 1
