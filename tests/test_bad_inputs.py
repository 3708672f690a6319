"""The bad-input corpus: every command and recipe, each bad input -> exit 2, one line, the file/field named,
and the output directory left exactly as it was (absent, or unchanged when resuming).

Runs the CLI in-process (``excise.cli.main``) on tiny models and tiny data files in one workspace; a few
cases go through the real entry point in a subprocess (see the end of the module).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

BINARY = bytes(range(256)) * 4  # NULs and invalid UTF-8
LATIN1 = "Ça coûte 10 €, très cher\n".encode("latin-1", errors="replace")


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _bbq_subset(src: Path, dst: Path, every: int = 100, block: int = 8) -> None:
    """The first ``block`` rows of every ``every``: a few templates with their ambiguous/disambiguated pairs."""
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(x for i in range(0, len(lines), every) for x in lines[i:i + block]) + "\n",
                   encoding="utf-8")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: tiny models (good and broken), tiny data (good and broken), a file to nest --out under."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # as `excise` does when stderr is not a terminal
    yield _workspace(tmp_path_factory)
    if bars:
        hf_logging.enable_progress_bar()


def _workspace(tmp_path_factory) -> Path:
    from excise.tasks.bbq import packaged_bbq_dir
    from excise.testing import save_tiny

    w = tmp_path_factory.mktemp("ws")
    save_tiny("llama", w / "tiny")
    save_tiny("gpt2", w / "gpt2")  # learned positions: 128 of them
    save_tiny("bert", w / "bert")
    for name, cfg in (("badcfg", BINARY), ("badjson", b"{not json")):
        (w / name).mkdir()
        (w / name / "config.json").write_bytes(cfg)
    shutil.copytree(w / "tiny", w / "badweights")
    (w / "badweights" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + BINARY)
    shutil.copytree(w / "tiny", w / "truncweights")
    data = (w / "tiny" / "model.safetensors").read_bytes()
    (w / "truncweights" / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(w / "tiny", w / "noweights")
    (w / "noweights" / "model.safetensors").unlink()
    (w / "nocfg").mkdir()
    (w / "nocfg" / "weights.bin").write_bytes(b"x")

    pk = packaged_bbq_dir()
    for name in ("bbq", "bbq_empty", "bbq_bin", "bbq_latin1", "bbq_badrow"):
        (w / name).mkdir()
        _bbq_subset(pk / "SES.jsonl", w / name / "SES.jsonl")
    _bbq_subset(pk / "Age.jsonl", w / "bbq" / "Age.jsonl")
    (w / "bbq_empty" / "Age.jsonl").write_text("")
    (w / "bbq_bin" / "Age.jsonl").write_bytes(BINARY)
    (w / "bbq_latin1" / "Age.jsonl").write_bytes(LATIN1)
    (w / "bbq_badrow" / "Age.jsonl").write_text('{"example_id": 0, "category": "Age"}\n')

    (w / "afile").write_text("I am a file\n")
    (w / "binary.jsonl").write_bytes(BINARY)
    (w / "latin1.jsonl").write_bytes(LATIN1)
    (w / "empty.jsonl").write_text("")
    (w / "adir").mkdir()
    (w / "notjson.jsonl").write_text('{"prompt": "1+1=", "answer": 2}\nnot json\n')
    rows = [json.loads(x) for x in (w / "bbq" / "Age.jsonl").read_text().splitlines()[:6]]
    (w / "preds.jsonl").write_text("".join(json.dumps({**r, "pred": 0}) + "\n" for r in rows))
    (w / "preds_bad.jsonl").write_text("".join(json.dumps({**r, "pred": 7}) + "\n" for r in rows))
    (w / "forget.jsonl").write_text("".join(json.dumps({"prompt": f"{a}*3=", "answer": a * 3, "op": "mul"}) + "\n"
                                            for a in range(10)))
    (w / "retain.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+3=", "answer": a + 3, "op": "add"}) + "\n"
                                            for a in range(10)))
    (w / "bad_answer.jsonl").write_text('{"prompt": "1+1=", "answer": "two"}\n')
    (w / "spec_bad.yaml").write_text("name: x\nforget: 3\n")
    (w / "spec.bin").write_bytes(BINARY)
    (w / "table.csv").write_text("text,label,group\nhello,0,a\n")
    (w / "table_bin.csv").write_bytes(BINARY)
    (w / "table_empty.csv").write_text("")
    (w / "captions_bad").mkdir()
    (w / "captions_bad" / "image_caption.csv").write_text("image,en_caption\nx.png,hi\n")
    (w / "captions_bin").mkdir()
    (w / "captions_bin" / "image_caption.csv").write_bytes(BINARY)

    rec = w / "recipes"
    rec.mkdir()
    recipes = {
        "empty": "",
        "binary": None,
        "list": "- a\n- b\n",
        "noworkflow": "out: x\nmodel: m\n",
        "badyaml": "workflow: bbq\ncategories: [Age, SES\n",
        "inspect_key": "workflow: inspect\nmodel: {W}/tiny\nn_promts: 2\n",
        "inspect_n": "workflow: inspect\nmodel: {W}/tiny\nn_prompts: 0\n",
        "inspect_cat": "workflow: inspect\nmodel: {W}/tiny\ncategories: [Age, Nope]\n",
        "inspect_device": "workflow: inspect\nmodel: {W}/tiny\ndevice: tpu9\n",
        "inspect_seed": "workflow: inspect\nmodel: {W}/tiny\nseed: -7\n",
        "inspect_outfile": "workflow: inspect\nmodel: {W}/tiny\nout: {W}/afile/sub\n",
        "bbq_cat": "workflow: bbq\nmodel: {W}/tiny\ndata_dir: {W}/bbq\ncategories:\n  - Age\n  - Nope\n",
        "bbq_k": "workflow: bbq\nmodel: {W}/tiny\ndata_dir: {W}/bbq\ncategories: [Age]\nselect:\n  k: 1000\n",
        "bbq_per_category": "workflow: bbq\nmodel: {W}/tiny\nper_category: 0\n",
        "bbq_scale": "workflow: bbq\nmodel: {W}/tiny\nhead_scale: 1.5\n",
        "bbq_seed": "workflow: bbq\nmodel: {W}/tiny\nseed: 4294967297\n",
        "bbq_data": "workflow: bbq\nmodel: {W}/tiny\ndata_dir: {W}/nosuch\ncategories: [Age]\n",
        "bbq_emptydata": "workflow: bbq\nmodel: {W}/tiny\ndata_dir: {W}/bbq_empty\ncategories: [Age]\n",
        "bbq_model": "workflow: bbq\nmodel: {W}/badweights\ndata_dir: {W}/bbq\ncategories: [Age]\n",
        "bbq_cats_empty": "workflow: bbq\nmodel: {W}/tiny\ncategories: []\n",
        "concept_spec": "workflow: concept\nmodel: {W}/tiny\nconcept: {W}/nosuch.yaml\n",
        "concept_spec_bad": "workflow: concept\nmodel: {W}/tiny\nconcept: {W}/spec_bad.yaml\n",
        "concept_k": "workflow: concept\nmodel: {W}/tiny\nunits: head\nselect:\n  k: 999\n",
        "concept_tokens": "workflow: concept\nmodel: {W}/tiny\nmax_new_tokens: 0\n",
        "concept_device": "workflow: concept\nmodel: {W}/tiny\ndevice: tpu9\n",
        "concept_model": "workflow: concept\nmodel: {W}/badcfg\n",
        "undo_alpha": "workflow: undo\nmodel: {W}/tiny\nalphas: [1.7]\n",
        "undo_alpha0": "workflow: undo\nmodel: {W}/tiny\nalphas: [0.0]\n",
        "undo_seeds": "workflow: undo\nmodel: {W}/tiny\nseeds: []\n",
        "undo_seed_neg": "workflow: undo\nmodel: {W}/tiny\nseeds: [0, -7]\n",
        "undo_forget": "workflow: undo\nmodel: {W}/tiny\nforget_file: {W}/nosuch.jsonl\nretain_file: {W}/retain.jsonl\n",
        "undo_forget_bin": "workflow: undo\nmodel: {W}/tiny\nforget_file: {W}/binary.jsonl\nretain_file: {W}/retain.jsonl\n",
        "undo_forget_only": "workflow: undo\nmodel: {W}/tiny\nforget_file: {W}/forget.jsonl\n",
        "undo_from": "workflow: undo\nmodel: {W}/tiny\nundo_from: nosuch\n",
        "undo_eval": "workflow: undo\nmodel: {W}/tiny\neval_n_per_op: 0\n",
        "undo_model": "workflow: undo\nmodel: {W}/truncweights\n",
        "pipeline_loc": "workflow: pipeline\nmodel: {W}/tiny\ntask: {{name: bbq, categories: [Age]}}\n"
                        "stages: [{{locate: {{method: nope}}}}]\n",
        "pipeline_k": "workflow: pipeline\nmodel: {W}/tiny\ntask: {{name: bbq, categories: [Age]}}\n"
                      "stages:\n  - measure: {{}}\n  - select: {{method: topk, k: 0}}\n",
        "pipeline_task": "workflow: pipeline\nmodel: {W}/tiny\ntask: {{name: wino}}\nstages: [{{measure: {{}}}}]\n",
        "fair_model": "workflow: fair\nmodel: {W}/badcfg\n",
        "fair_lambda": "workflow: fair\nmodel: {W}/bert\nfair:\n  epochs: 1\n",
        "fair_user": "workflow: fair\nmodel: {W}/bert\ndata: user\nuser_data:\n  path: {W}/nosuch.csv\n",
        "fair_user_bin": "workflow: fair\nmodel: {W}/bert\ndata: user\nuser_data:\n  path: {W}/table_bin.csv\n",
        "fair_user_empty": "workflow: fair\nmodel: {W}/bert\ndata: user\nuser_data:\n  path: {W}/table_empty.csv\n",
        "fair_nboot": "workflow: fair\nmodel: {W}/bert\nn_boot: 1\n",
        "fair_device": "workflow: fair\nmodel: {W}/bert\ndevice: tpu9\n",
        "captions_langs": "workflow: captions\nlangs: [fr]\n",
        "captions_nolangs": "workflow: captions\nlangs: []\n",
        "captions_data": "workflow: captions\ndata: {W}/nosuch\n",
        "captions_data_bad": "workflow: captions\ndata: {W}/captions_bad\n",
        "captions_data_bin": "workflow: captions\ndata: {W}/captions_bin\n",
        "captions_model": "workflow: captions\nmodel: {W}/badcfg\n",
        "captions_device": "workflow: captions\ndevice: tpu9\n",
        "captions_neval": "workflow: captions\nn_eval: 0\n",
    }
    for name, text in recipes.items():
        p = rec / f"{name}.yaml"
        if text is None:
            p.write_bytes(BINARY)
        else:
            p.write_text(text.replace("{W}", str(w)).replace("{{", "{").replace("}}", "}"))
    (rec / "latin1.yaml").write_bytes(b"workflow: inspect\nmodel: caf\xe9\n")

    # a finished localize stage whose selected_heads.json holds non-integers (for a resumed `bbq mitigate`)
    from excise.commands.bbq import _debias_config

    cfg = _debias_config(str(w / "tiny"), "Age", 24, "loglik", 0, [f"data_dir={w / 'bbq'}"],
                         pairs_per_category=8, split_by=None, select={"method": "topk", "k": 3}, head_scale=0.2,
                         finetune={"method": "lora", "steps": 12})
    resumed = w / "resumed"
    resumed.mkdir()
    (resumed / "config.json").write_text(json.dumps({"workflow": "bbq", **cfg.model_dump(mode="json")}))
    for st in ("eval_before", "localize"):
        (resumed / st).mkdir()
        (resumed / st / "stage.json").write_text('{"status": "done"}')
    (resumed / "localize" / "selected_heads.json").write_text('{"heads": [["a", 1.5]]}')
    (resumed / "localize" / "metrics.json").write_text("{}")
    # a finished run of another config, for --force with bad input: it must be left exactly as it was
    old = w / "oldrun"
    (old / "data").mkdir(parents=True)
    (old / "config.json").write_text('{"workflow": "bbq-eval", "model": "an older run"}\n')
    (old / "run.json").write_text('{"stages": {"data": {"seconds": 1.0}}}\n')
    (old / "data" / "stage.json").write_text('{"status": "done"}\n')
    (old / "data" / "items.jsonl").write_text('{"example_id": 0}\n')
    (w / "cwd").mkdir()
    return w


def _cases() -> list[tuple[str, list[str], list[str]]]:
    """(id, argv, needles in the error line); ``{W}`` is the workspace. Output goes under {W}/out unless named."""
    T, B = "{W}/tiny", "{W}/bbq"
    out = ["--out", "{W}/out"]
    bbq_eval = ["bbq", "eval", "--model", T, "--data-dir", B, "--categories", "Age", "--per-category", "4", *out]
    loc = ["bbq", "localize", "--model", T, "--categories", "Age", "--set", f"data_dir={B}", *out]
    probe = ["concept", "probe", "--model", T, *out]
    insp = ["inspect", "--model", T, *out]
    unl = ["undo", "unlearn", "--model", T, *out]
    c: list[tuple[str, list[str], list[str]]] = []

    def add(cid, argv, *needles):
        c.append((cid, argv, list(needles)))

    # ---- models: broken directories, for every command that loads one
    for cmd_id, base in (("eval", bbq_eval), ("inspect", insp), ("probe", probe), ("localize", loc), ("unlearn", unl)):
        flag = "--model"
        i = base.index(flag)
        for mid, needle in (("badcfg", "badcfg/config.json"), ("badjson", "badjson/config.json"),
                            ("badweights", "model.safetensors"), ("truncweights", "model.safetensors"),
                            ("noweights", "noweights"), ("nocfg", "config.json"), ("nosuch", "nosuch")):
            argv = base[:i + 1] + [f"{{W}}/{mid}"] + base[i + 2:]
            add(f"{cmd_id}-model-{mid}", argv, needle)
    add("eval-model-hubid-offline", bbq_eval[:3] + ["nosuch/model"] + bbq_eval[4:], "nosuch/model")
    # ---- options with ranges
    for cid, base in (("eval", bbq_eval), ("localize", loc), ("unlearn", unl)):
        add(f"{cid}-seed-neg", base + ["--seed", "-7"], "seed")
        add(f"{cid}-seed-big", base + ["--seed", str(2 ** 32 + 1)], "seed")
    add("pretrain-seed-neg", ["undo", "pretrain", "--seed", "-7", *out], "seed")
    for cid, base in (("eval", bbq_eval), ("inspect", insp), ("probe", probe)):
        add(f"{cid}-device", base + ["--device", "tpu9"], "tpu9")
        add(f"{cid}-device-cuda", base + ["--device", "cuda:7"], "cuda")
    add("localize-device", loc + ["--set", "device=tpu9"], "tpu9")
    add("concept-localize-device", ["concept", "localize", "--model", T, "--device", "tpu9", *out], "tpu9")
    for cid, base in (("eval", bbq_eval), ("inspect", insp)):
        add(f"{cid}-dtype", base + ["--dtype", "float8"], "float8")
    add("eval-categories-empty", bbq_eval[:-4] + ["--categories", "", *out], "categories")
    add("eval-categories-commas", bbq_eval[:-4] + ["--categories", ",,", *out], "categories")
    add("eval-categories-unknown", bbq_eval[:-4] + ["--categories", "Age,Nope", *out], "Nope")
    add("localize-categories-commas", ["bbq", "localize", "--model", T, "--categories", ",,", *out], "categories")
    add("eval-per-category-neg", bbq_eval + ["--per-category", "-3"], "per_category")
    add("eval-scoring", bbq_eval + ["--scoring", "vibes"], "scoring")
    add("eval-normalize", bbq_eval + ["--normalize", "bytes"], "normalize")
    add("eval-nboot", bbq_eval + ["--n-boot", "0"], "n_boot")
    add("eval-batch", bbq_eval + ["--batch-size", "0"], "batch_size")
    add("eval-seed-text", bbq_eval + ["--seed", "abc"], "--seed")
    add("eval-unknown-flag", bbq_eval + ["--nosuchflag"], "--nosuchflag")
    add("localize-k", loc + ["--k", "1000"], "1000", "8")
    add("localize-k0", loc + ["--k", "0"], "k")
    add("localize-pairs", loc + ["--pairs-per-category", "0"], "pairs_per_category")
    add("localize-pairs-1", loc + ["--pairs-per-category", "1"], "pairs_per_category")
    add("localize-per-category", loc + ["--per-category", "0"], "per_category")
    add("localize-scale", loc + ["--head-scale", "1.5"], "head_scale")
    add("localize-steps", loc + ["--steps", "-1"], "steps")
    add("localize-method", loc + ["--method", "magic"], "method")
    add("localize-split", loc + ["--split-by", "sentences"], "split_by")
    add("localize-set-unknown", loc + ["--set", "nosuch=1"], "nosuch")
    add("localize-set-syntax", loc + ["--set", "nokey"], "KEY.PATH=VALUE")
    add("mitigate-resumed-heads", ["bbq", "mitigate", "--model", T, "--categories", "Age", "--set", f"data_dir={B}",
                                   "--out", "{W}/resumed"], "selected_heads.json")
    add("probe-tokens", probe + ["--max-new-tokens", "-1"], "max")
    add("probe-adapter", probe + ["--adapter", "{W}/nosuch_adapter"], "nosuch_adapter")
    add("probe-adapter-file", probe + ["--adapter", "{W}/afile"], "afile")
    add("probe-concept", ["concept", "probe", "--model", T, "--concept", "{W}/nosuch.yaml", *out], "nosuch.yaml")
    add("probe-concept-bad", ["concept", "probe", "--model", T, "--concept", "{W}/spec_bad.yaml", *out], "spec_bad.yaml")
    add("probe-concept-bin", ["concept", "probe", "--model", T, "--concept", "{W}/spec.bin", *out], "spec.bin")
    add("concept-localize-k", ["concept", "localize", "--model", T, "--units", "head", "--k", "999", *out], "999")
    add("concept-localize-units", ["concept", "localize", "--model", T, "--units", "layer", *out], "units")
    add("concept-localize-method", ["concept", "localize", "--model", T, "--method", "magic", *out], "method")
    add("concept-unlearn-objective", ["concept", "unlearn", "--model", T, "--objective", "forget", *out], "objective")
    add("concept-unlearn-steps", ["concept", "unlearn", "--model", T, "--steps", "0", *out], "steps")
    add("concept-unlearn-lr", ["concept", "unlearn", "--model", T, "--lr", "-1", *out], "lr")
    add("concept-unlearn-set", ["concept", "unlearn", "--model", T, "--set", "unlearn.stepz=3", *out], "unlearn.stepz")
    add("concept-run-recipe", ["concept", "run", "--recipe", "{W}/recipes/concept_k.yaml", *out], "concept_k.yaml")
    add("concept-run-recipe-missing", ["concept", "run", "--recipe", "{W}/nosuch.yaml", *out], "nosuch.yaml")
    # ---- data files
    add("eval-data-missing", bbq_eval[:5] + ["{W}/nosuch"] + bbq_eval[6:], "nosuch")
    add("eval-data-file", bbq_eval[:5] + ["{W}/afile"] + bbq_eval[6:], "afile")
    for d in ("bbq_empty", "bbq_bin", "bbq_latin1", "bbq_badrow"):
        add(f"eval-{d}", bbq_eval[:5] + [f"{{W}}/{d}"] + bbq_eval[6:], f"{d}/Age.jsonl")
    add("eval-hf-missing", ["bbq", "eval", "--model", T, "--hf-dataset", "{W}/nosuch", "--categories", "Age", *out], "nosuch")
    add("eval-hf-bin", ["bbq", "eval", "--model", T, "--hf-dataset", "{W}/binary.jsonl", "--categories", "Age", *out],
        "binary.jsonl")
    add("localize-data-empty", ["bbq", "localize", "--model", T, "--categories", "Age", "--set",
                                "data_dir={W}/bbq_empty", *out], "bbq_empty/Age.jsonl")
    add("localize-data-bin", ["bbq", "localize", "--model", T, "--categories", "Age", "--set",
                              "data_dir={W}/bbq_bin", *out], "bbq_bin/Age.jsonl")
    for f in ("binary", "latin1", "empty", "notjson", "preds_bad"):
        add(f"score-{f}", ["bbq", "score", f"{{W}}/{f}.jsonl", *out], f"{f}.jsonl")
    add("score-dir", ["bbq", "score", "{W}/adir", *out], "adir")
    add("score-missing", ["bbq", "score", "{W}/nosuch.jsonl", *out], "nosuch.jsonl")
    add("score-nboot", ["bbq", "score", "{W}/preds.jsonl", "--n-boot", "0", *out], "n-boot")
    add("score-seed", ["bbq", "score", "{W}/preds.jsonl", "--seed", "-7", *out], "seed")
    add("score-out-file", ["bbq", "score", "{W}/preds.jsonl", "--out", "{W}/afile/sub"], "afile")
    for f in ("binary", "latin1", "empty", "notjson", "bad_answer", "nosuch"):
        add(f"unlearn-forget-{f}", unl + ["--forget-file", f"{{W}}/{f}.jsonl"], f"{f}.jsonl")
    add("unlearn-retain-dir", unl + ["--retain-file", "{W}/adir"], "adir")
    add("unlearn-eval-n", unl + ["--eval-n", "0"], "eval")
    add("unlearn-steps", unl + ["--steps", "-1"], "steps")
    add("unlearn-method", unl + ["--method", "magic"], "method")
    add("unlearn-lr", unl + ["--lr", "0"], "lr")
    add("pretrain-steps", ["undo", "pretrain", "--steps", "-1", *out], "steps")
    add("pretrain-threads", ["undo", "pretrain", "--threads", "-2", *out], "threads")
    add("noise-alpha", ["undo", "noise", "--model", T, "--alpha", "1.7", *out], "alpha")
    add("noise-mask-from", ["undo", "noise", "--model", T, "--mask-from", "magic", *out], "mask-from")
    add("noise-needs-base", ["undo", "noise", "--model", T, "--mask-from", "fisher", *out], "--base")
    add("noise-top-p", ["undo", "noise", "--model", T, "--top-p", "0", "--mask-from", "paramdiff", "--base", T, *out],
        "top")
    add("noise-model", ["undo", "noise", "--model", "{W}/badweights", *out], "model.safetensors")
    add("distill-steps", ["undo", "distill", "--teacher", T, "--student", T, "--max-steps", "-1", *out], "max_steps")
    add("distill-eval", ["undo", "distill", "--teacher", T, "--student", T, "--eval-n", "0", *out], "eval")
    add("distill-student", ["undo", "distill", "--teacher", T, "--student", "{W}/nosuch", *out], "nosuch")
    add("relearn-lrs", ["undo", "relearn", "--model", T, "--lrs", "fast", *out], "--lrs")
    add("relearn-lrs-empty", ["undo", "relearn", "--model", T, "--lrs", ",", *out], "lrs")
    add("relearn-data", ["undo", "relearn", "--model", T, "--data", "all", *out], "data")
    add("relearn-forget", ["undo", "relearn", "--model", T, "--forget-file", "{W}/binary.jsonl", *out], "binary.jsonl")
    add("undo-run-config", ["undo", "run", "--config", "{W}/recipes/undo_alpha.yaml", *out], "undo_alpha.yaml")
    # ---- --out where it cannot be
    sub = ["--out", "{W}/afile/sub"]
    add("eval-out-file", bbq_eval[:-2] + sub, "afile")
    add("eval-out-is-file", bbq_eval[:-2] + ["--out", "{W}/afile"], "afile")
    add("inspect-out-file", insp[:-2] + sub, "afile")
    add("probe-out-file", probe[:-2] + sub, "afile")
    add("localize-out-file", loc[:-2] + sub, "afile")
    add("unlearn-out-file", unl[:-2] + sub, "afile")
    add("noise-out-file", ["undo", "noise", "--model", T, *sub], "afile")
    add("relearn-out-file", ["undo", "relearn", "--model", T, *sub], "afile")
    add("pretrain-out-file", ["undo", "pretrain", "--steps", "1", *sub], "afile")
    add("run-out-file", ["run", "{W}/recipes/inspect_outfile.yaml"], "afile")
    add("eval-out-notempty", bbq_eval[:-2] + ["--out", "{W}/adir_full"], "adir_full")
    # ---- inspect
    add("inspect-n", insp + ["--n-prompts", "0"], "n_prompts")
    add("inspect-n-big", insp + ["--n-prompts", "100"], "n_prompts")
    add("inspect-long-prompt", ["inspect", "--model", "{W}/gpt2", *out], "128")
    # ---- fair
    fair = ["fair", "train", "--set", "model={W}/bert", *out]
    add("fair-lambda", fair + ["--set", "fair.lambda_eo=-1"], "fair.lambda_eo")
    add("fair-unknown", fair + ["--set", "nosuch=1"], "nosuch")
    add("fair-seed", fair + ["--set", "seed=-1"], "seed")
    add("fair-device", fair + ["--set", "device=tpu9"], "tpu9")
    add("fair-model", ["fair", "train", "--set", "model={W}/badcfg", *out], "badcfg/config.json")
    add("fair-user-missing", fair + ["--set", "data=user", "--set", "user_data.path={W}/nosuch.csv"], "nosuch.csv")
    add("fair-user-bin", fair + ["--set", "data=user", "--set", "user_data.path={W}/table_bin.csv"], "table_bin.csv")
    add("fair-user-empty", fair + ["--set", "data=user", "--set", "user_data.path={W}/table_empty.csv"],
        "table_empty.csv")
    add("fair-user-nodata", fair + ["--set", "data=user"], "user_data")
    add("fair-config-missing", ["fair", "train", "--config", "{W}/nosuch.yaml", *out], "nosuch.yaml")
    add("fair-config-bin", ["fair", "compare", "--config", "{W}/recipes/binary.yaml", *out], "binary.yaml")
    add("fair-out-file", ["fair", "train", "--set", "model={W}/bert", *sub], "afile")
    add("fair-eval-missing", ["fair", "eval", "{W}/nosuch"], "nosuch")
    add("fair-eval-nboot", ["fair", "eval", "{W}/adir", "--n-boot", "0"], "n-boot")
    add("fair-export-missing", ["fair", "export", "--run", "{W}/nosuch", "--to", "{W}/out"], "nosuch")
    # ---- captions
    cap = ["captions", "extract", *out]
    add("captions-langs", cap + ["--set", "langs=[fr]"], "langs")
    add("captions-nolangs", cap + ["--set", "langs=[]"], "langs")
    add("captions-neval", cap + ["--set", "n_eval=0"], "n_eval")
    add("captions-data", cap + ["--set", "data={W}/nosuch"], "nosuch")
    add("captions-data-file", cap + ["--set", "data={W}/afile"], "afile")
    add("captions-data-bad", cap + ["--set", "data={W}/captions_bad"], "image_caption.csv")
    add("captions-data-bin", cap + ["--set", "data={W}/captions_bin"], "image_caption.csv")
    add("captions-model", cap + ["--set", "model={W}/badcfg"], "badcfg/config.json")
    add("captions-device", cap + ["--set", "device=tpu9"], "tpu9")
    add("captions-seed", cap + ["--set", "seed=-3"], "seed")
    add("captions-out-file", ["captions", "run", *sub], "afile")
    add("captions-config", ["captions", "sae", "--config", "{W}/nosuch.yaml", *out], "nosuch.yaml")
    # ---- excise run: every workflow's recipe
    needles = {
        "empty": "mapping", "binary": "UTF-8", "list": "mapping", "noworkflow": "workflow", "badyaml": "badyaml.yaml:",
        "latin1": "latin1.yaml", "inspect_key": "inspect_key.yaml:3:n_promts", "inspect_n": "inspect_n.yaml:3:n_prompts",
        "inspect_cat": "inspect_cat.yaml:3:categories", "inspect_device": "inspect_device.yaml:3:device",
        "inspect_seed": "inspect_seed.yaml:3:seed", "bbq_cat": "bbq_cat.yaml:4:categories",
        "bbq_k": "bbq_k.yaml:6:select.k", "bbq_per_category": "bbq_per_category.yaml:3:per_category",
        "bbq_scale": "bbq_scale.yaml:3:head_scale", "bbq_seed": "bbq_seed.yaml:3:seed", "bbq_data": "nosuch",
        "bbq_emptydata": "bbq_empty/Age.jsonl", "bbq_model": "model.safetensors",
        "bbq_cats_empty": "bbq_cats_empty.yaml:3:categories",
        "concept_spec": "nosuch.yaml", "concept_spec_bad": "spec_bad.yaml", "concept_k": "concept_k.yaml:5:select.k",
        "concept_tokens": "concept_tokens.yaml:3:max_new_tokens", "concept_device": "concept_device.yaml:3:device",
        "concept_model": "badcfg/config.json", "undo_alpha": "undo_alpha.yaml:3:alphas",
        "undo_alpha0": "undo_alpha0.yaml:3:alphas", "undo_seeds": "undo_seeds.yaml:3:seeds",
        "undo_seed_neg": "undo_seed_neg.yaml:3:seeds", "undo_forget": "nosuch.jsonl", "undo_forget_bin": "binary.jsonl",
        "undo_forget_only": "retain_file", "undo_from": "undo_from.yaml:3:undo_from",
        "undo_eval": "undo_eval.yaml:3:eval_n_per_op", "undo_model": "model.safetensors",
        "pipeline_loc": "nope", "pipeline_k": "pipeline_k.yaml:6:stages.1.select", "pipeline_task": "pipeline_task.yaml", "fair_model": "badcfg/config.json", "fair_lambda": "fair_lambda.yaml",
        "fair_user": "nosuch.csv", "fair_user_bin": "table_bin.csv", "fair_user_empty": "table_empty.csv",
        "fair_nboot": "fair_nboot.yaml:3:n_boot", "fair_device": "fair_device.yaml:3:device",
        "captions_langs": "captions_langs.yaml:2:langs", "captions_nolangs": "captions_nolangs.yaml",
        "captions_data": "nosuch", "captions_data_bad": "image_caption.csv", "captions_data_bin": "image_caption.csv",
        "captions_model": "badcfg/config.json", "captions_device": "captions_device.yaml:2:device",
        "captions_neval": "captions_neval.yaml:2:n_eval",
    }
    for name, needle in needles.items():
        add(f"run-{name}", ["run", f"{{W}}/recipes/{name}.yaml", *out], needle)
    add("run-missing", ["run", "{W}/nosuch.yaml", *out], "recipe not found")
    add("run-dir", ["run", "{W}/adir", *out], "adir")
    add("run-set", ["run", "{W}/recipes/inspect_n.yaml", "--set", "n_prompts=-1", *out], "n_prompts")
    # ---- --force on an existing run: bad input is refused before the old run is touched (the first stage's
    # own checks included: a forced run's predecessor is only moved aside until that stage finishes)
    force = ["--out", "{W}/oldrun", "--force"]
    for name in ("bbq_emptydata", "bbq_model", "bbq_k", "concept_spec", "concept_model", "concept_k", "undo_forget_bin",
                 "undo_model", "undo_from", "fair_model", "fair_user_empty", "captions_data_bad", "captions_model",
                 "inspect_cat", "pipeline_loc"):
        add(f"force-run-{name}", ["run", f"{{W}}/recipes/{name}.yaml", *force], needles[name])
    add("force-eval-model", bbq_eval[:-2] + ["--model", "{W}/badweights", *force], "model.safetensors")
    add("force-eval-data", bbq_eval[:-2] + ["--data-dir", "{W}/bbq_empty", *force], "bbq_empty/Age.jsonl")
    add("force-eval-device", bbq_eval[:-2] + ["--device", "tpu9", *force], "tpu9")
    add("force-localize-k", loc[:-2] + ["--k", "1000", *force], "1000")
    add("force-undo-run", ["undo", "run", "--config", "{W}/recipes/undo_model.yaml", *force], "model.safetensors")
    add("models-json-arg", ["models", "--nosuch"], "--nosuch")
    add("demo-unknown", ["demo", "nosuch", *out], "nosuch")
    return c


CASES = _cases()


def test_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 100
    firsts = {argv[0] for _, argv, _ in CASES}
    assert firsts >= {"bbq", "concept", "undo", "fair", "captions", "run", "inspect", "models"}


def _main(argv: list[str]) -> int:
    from excise.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


@pytest.mark.parametrize("cid, argv, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, cid, argv, needles, capsys, monkeypatch):
    monkeypatch.chdir(ws / "cwd")
    monkeypatch.setenv("EXCISE_CACHE", str(ws / "cache"))
    (ws / "adir_full").mkdir(exist_ok=True)
    (ws / "adir_full" / "keep.txt").write_text("mine\n")
    argv = [a.replace("{W}", str(ws)) for a in argv]
    before = _snapshot(ws)
    capsys.readouterr()
    code, after = 1, None
    try:
        code = _main(argv)
    finally:
        after = _remove_new(ws, before)  # a failing case must not spoil the next one
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert code == 2, (code, cap.err[-3000:], cap.out[-500:])
    assert len(lines) == 1, cap.err[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n.replace("{W}", str(ws)) in lines[0], (n, lines[0])
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]


def _remove_new(root: Path, before: dict[str, str]) -> dict[str, str]:
    """Delete what a case added under ``root``; returns the snapshot taken before deleting."""
    now = _snapshot(root)
    for rel in sorted(set(now) - set(before), key=len):
        p = root / rel
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    return now


# ---- the real entry point, in a subprocess

def _cli(args, cwd, timeout=180):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "excise.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("cid", ["eval-model-badweights", "eval-bbq_bin", "unlearn-eval-n", "eval-seed-text",
                                 "run-undo_alpha", "force-run-undo_model"])
def test_bad_input_subprocess(ws, cid):
    _, argv, needles = next(c for c in CASES if c[0] == cid)
    argv = [a.replace("{W}", str(ws)) for a in argv]
    before = _snapshot(ws)
    r = _cli(argv, ws / "cwd")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n.replace("{W}", str(ws)) in lines[0]
    assert _snapshot(ws) == before
