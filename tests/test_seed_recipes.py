"""Seed-scale recipes (issue 19): each validates, `excise plan` estimates it offline from the model's
config (exact parameter counts on the meta device), refuses what does not fit, and `--dry-run` runs
every stage on a tiny random model of the same family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from excise.recipes.plan import KNOWN_CONFIGS, StagePlan, plan_file, plan_table

SEED_RECIPES = ("seed_bbq_llama32_1b", "seed_concept_qwen25_3b", "seed_fair_bge_large", "seed_captions_llava15_7b",
                "seed_undo_gemma2")
# published sizes (model cards), in billions of parameters
PUBLISHED = {"meta-llama/Llama-3.2-1B-Instruct": 1.24, "Qwen/Qwen2.5-3B-Instruct": 3.09,
             "BAAI/bge-large-en-v1.5": 0.335, "llava-hf/llava-1.5-7b-hf": 7.06}


@pytest.mark.parametrize("recipe", SEED_RECIPES)
def test_every_seed_recipe_plans_offline(recipe):
    p = plan_file(recipe)
    assert p["stages"] and p["peak_gib"] > 0 and p["total_seconds"] > 0
    assert p["fits"], f"{recipe} does not fit its own declared hardware: {p['peak_gib']} GiB"
    if p["model"] in PUBLISHED:
        assert abs(p["n_params"] / 1e9 - PUBLISHED[p["model"]]) / PUBLISHED[p["model"]] < 0.02


def test_memory_model_scales_as_documented():
    """Full fine-tuning pays gradients + Adam + master weights per parameter; LoRA does not; FSDP shards."""
    model = "Qwen/Qwen2.5-3B-Instruct"
    assert model in KNOWN_CONFIGS
    st = [StagePlan("ft", "train", 1, 16, 16, "full")]
    one = plan_table(model, "bfloat16", st)["stages"][0]["gib"]
    n = 3.086e9
    assert one["weights"] == pytest.approx(2 * n / 1024**3, rel=0.01)
    assert one["optimizer"] == pytest.approx(12 * n / 1024**3, rel=0.01)  # Adam moments 8 + fp32 master 4
    two = plan_table(model, "bfloat16", st, n_gpus=2, fsdp=True)["stages"][0]["gib"]
    assert two["weights"] == pytest.approx(one["weights"] / 2, rel=0.01)
    lora = plan_table(model, "bfloat16", [StagePlan("ft", "train", 1, 16, 16, "lora", None, 8)])["stages"][0]["gib"]
    assert lora["optimizer"] < 0.01 * one["optimizer"]
    ckpt = plan_table(model, "bfloat16", [StagePlan("ft", "train", 8, 2048, 1, "lora", None, 8)], grad_ckpt=True)
    full = plan_table(model, "bfloat16", [StagePlan("ft", "train", 8, 2048, 1, "lora", None, 8)])
    assert ckpt["stages"][0]["gib"]["activations"] < 0.2 * full["stages"][0]["gib"]["activations"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "excise.cli", *args], capture_output=True, text=True, timeout=300)


def test_plan_cli_prints_and_refuses_what_does_not_fit():
    r = _cli("plan", "seed_bbq_llama32_1b.yaml", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_params"] > 1e9
    r = _cli("plan", "seed_captions_llava15_7b.yaml", "--gpu-memory", "16")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "GiB" in lines[0] and "Traceback" not in r.stderr
    r = _cli("plan", "seed_bbq_llama32_1b.yaml", "--gpu", "tpu9")
    assert r.returncode == 2 and "unknown GPU" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SEED_RECIPES)
def test_dry_run_every_stage_on_a_tiny_model_of_the_family(recipe, tmp_path, monkeypatch):
    from excise.recipes.dry_run import dry_run_settings
    from excise.recipes.loader import run_recipe_file

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    run_recipe_file(recipe, out=tmp_path / "run", quick=True, transform=dry_run_settings)
    done = sorted(p.parent.name for p in (tmp_path / "run").rglob("stage.json"))
    assert done, "no stage finished"
    assert (tmp_path / "run" / "report.html").exists()
