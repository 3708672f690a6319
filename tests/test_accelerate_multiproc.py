"""excise.train.train in 2 processes on CPU (gloo, DDP) matches 1 process: same global batch, averaged grads.

Covered: the fine-tune stage (LoRA on examples, through finetune), and train() itself with gradient
accumulation, on a sequence of examples and on a stream of ready-made batches cut along the batch dimension.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from excise.intervene.heads import HeadScales
    from excise.intervene.lora import ChoiceExample, FinetuneConfig, finetune
    from excise.testing import tiny_handle, tiny_model
    from excise.train import Examples, TrainConfig, train

    h = tiny_handle("llama")
    ex = [ChoiceExample(f"prompt number {i} says", (" yes", " no way", " maybe so"), i % 3) for i in range(16)]
    acc = Accelerator(cpu=True, split_batches=True)
    hs = HeadScales.from_heads(h.anatomy, [(1, 2)], 0.2)
    r = finetune(h, ex, FinetuneConfig(steps=3, batch_size=4, lr=1e-2, seed=0), head_scales=hs, accelerator=acc)
    # train() itself: equal-length sequences (a token mean is an example mean), 2 accumulation steps,
    # so one process computes 2 parts of 4 and two processes 4 parts of 2; the Accelerator is train()'s own
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 250, (6,), generator=g) for _ in range(16)]
    def collate(c):
        ids = torch.stack(c)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    def stream():
        s = 0
        while True:
            i = (s * 8) % 16
            yield collate(seqs[i:i + 8])
            s += 1
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=8, grad_accum_steps=2, warmup_steps=1, schedule="linear")
    out = {}
    for name, data in (("examples", Examples(seqs, 8, collate=collate)), ("stream", stream())):
        t = train(tiny_model("llama"), data, lambda m, b: m(**b).loss, cfg)
        out[name] = {"losses": t.losses, "n": t.n_processes, "tokens": t.tokens,
                     "sd": {k: v.tolist() for k, v in t.model.state_dict().items()}}
    if acc.is_main_process:
        sd = {k: v.tolist() for k, v in r.model.state_dict().items() if "lora" in k}
        json.dump({"losses": r.losses, "n": r.n_processes, "sd": sd, "train": out}, open(sys.argv[1], "w"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # `accelerate launch --num_processes 2` runs torch.distributed.run underneath; call it directly (CPU, gloo)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert a["n"] == 1 and b["n"] == 2
    assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), atol=1e-5)
    assert a["sd"].keys() == b["sd"].keys() and a["sd"]
    for k in a["sd"]:
        assert torch.allclose(torch.tensor(a["sd"][k]), torch.tensor(b["sd"][k]), atol=1e-5), k
    # and the adapter did move (the comparison is not between two untouched inits)
    assert any(torch.tensor(v).abs().max() > 0 for k, v in a["sd"].items() if "lora_B" in k)
    for name in ("examples", "stream"):
        ta, tb = a["train"][name], b["train"][name]
        assert ta["n"] == 1 and tb["n"] == 2 and ta["tokens"] == tb["tokens"] == 3 * 8 * 6
        assert torch.allclose(torch.tensor(ta["losses"]), torch.tensor(tb["losses"]), atol=1e-5), name
        assert ta["sd"].keys() == tb["sd"].keys()
        for k in ta["sd"]:
            assert torch.allclose(torch.tensor(ta["sd"][k]), torch.tensor(tb["sd"][k]), atol=1e-5), (name, k)
    init = tiny_model_weights()
    assert any(not torch.allclose(torch.tensor(a["train"]["examples"]["sd"][k]), v) for k, v in init.items())


def tiny_model_weights():
    from excise.testing import tiny_model

    return {k: v.clone() for k, v in tiny_model("llama").state_dict().items()}


BARRIER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from excise.io import shared_dir
    from excise.processes import is_main_process, wait_for_everyone

    out = Path(sys.argv[1])
    if is_main_process():
        time.sleep(2)
        (out / "written").write_text("main")
    wait_for_everyone()  # before accelerate's own state exists: the first barrier of a recipe
    assert (out / "written").read_text() == "main", "the barrier let a process through before the main one wrote"
    with shared_dir(out / "cache") as tmp:  # every process builds, only the main one's copy lands
        if not is_main_process():
            time.sleep(1)
        (tmp / "who").write_text(os.environ["RANK"])
    assert (out / "cache" / "who").read_text() == "0"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
''')


def test_barrier_and_shared_folder_across_two_processes(tmp_path):
    """wait_for_everyone really waits on CPU (accelerate's default state would make it a no-op), and
    shared_dir leaves exactly the main process's folder."""
    script = tmp_path / "barrier.py"
    script.write_text(BARRIER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), str(script), str(tmp_path)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["seed_fair_bge_large.yaml", "seed_undo_gemma2.yaml"])
def test_a_whole_recipe_under_accelerate_launch(tmp_path, recipe):
    """Two launched CPU processes (gloo) run a whole workflow: every process runs each stage
    (training needs them all), only the main process writes the run directory, and the run ends with
    one report, as a single process does."""
    env = dict(os.environ, EXCISE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    # what `accelerate launch` runs underneath on GPUs (torch.distributed.run); on CPU it falls back to one process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "excise.cli", "run", recipe, "--dry-run", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    errors = [x for x in r.stderr.splitlines() if "Error" in x or "error:" in x]
    assert r.returncode == 0, "\n".join(errors[-10:]) or r.stderr[-2000:]
    stages = json.loads((out / "run.json").read_text())["stages"]
    expected = {"data", "baselines", "plain", "fair", "report"} if "fair" in recipe else {"models", "report"}
    assert expected <= set(stages), stages
    for stage in stages:
        assert json.loads((out / stage / "stage.json").read_text())["status"] == "done"
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert (out / "report.html").exists()
    assert not list(out.glob("*.tmp*")), "no half-written folder left by any process"
