"""`excise undo ...`: robust unlearning on arithmetic (UNDO), one command per stage.

Thin typer layer over the Python API; torch and transformers are imported inside commands.
Every stage that takes ``--model`` accepts an excise arithmetic model directory or any
supported Hugging Face decoder (directory or hub id); ``--forget-file`` / ``--retain-file``
take JSONL items ``{"prompt": ..., "answer": int, "op": ...}`` instead of the packaged generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from excise.commands import SET

app = typer.Typer(help="Robust unlearning on arithmetic: unlearning baselines, UNDO, targeted UNDO, relearning attacks.",
                  no_args_is_help=True)


def _console():
    from rich.console import Console

    return Console()


def _items(file: Optional[Path], group: str, n: int, seed: int, pool: str = "train") -> list:
    """Generated items, or a file's rows (checked as given: no retain row in a forget file) from one pool."""
    from excise.tasks.arithmetic import FORGET_OPS, OPS, RETAIN_OPS, load_items, split_pools, train_items

    if file is not None:
        return split_pools(load_items(file, group=group if group != "mixed" else None))[pool]
    return train_items({"forget": FORGET_OPS, "retain": RETAIN_OPS, "mixed": OPS}[group], n, seed)


def _eval(model, tok, n_per_op: int, forget_file: Optional[Path] = None, retain_file: Optional[Path] = None) -> dict:
    """Accuracy on the dev pool: what a hyperparameter sweep may look at (never the test pool)."""
    from excise.measure.arithmetic import accuracy_by_op
    from excise.tasks.arithmetic import OPS, eval_items

    items = eval_items(OPS, n_per_op, pool="dev") if forget_file is None and retain_file is None else \
        [it for f, g in ((forget_file, "forget"), (retain_file, "retain")) if f for it in _items(f, g, 0, 0, "dev")]
    return {k: v.as_dict() for k, v in accuracy_by_op(model, tok, items).items()}


def _write(out: Path, model, tok, info: dict) -> None:
    from excise.io import atomic_dir, atomic_write_json

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
        atomic_write_json(tmp / "excise_undo.json", info)


def _check(out: Optional[Path], **counts: int) -> None:
    """Up-front checks shared by the stage commands: --out can be created, counts are at least 1."""
    from excise.errors import ExciseError
    from excise.io import check_out_dir

    for name, n in counts.items():
        if n < 1:
            raise ExciseError(f"--{name.replace('_', '-')} must be at least 1, got {n}")
    if out is not None:
        check_out_dir(out)


def _show(acc: dict) -> str:
    return ", ".join(f"{k} {v['value']:.3f}" for k, v in acc.items() if v["value"] is not None)


@app.command()
def pretrain(
    out: Optional[Path] = typer.Option(None, help="model directory (default: the excise cache)"),
    oracle: bool = typer.Option(False, "--oracle", help="pretrain without multiplication and division"),
    steps: int = typer.Option(3000, help="optimizer steps"),
    seed: int = typer.Option(0, help="seed"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Pretrain the small arithmetic decoder (cached and seeded: same settings -> same weights)."""
    import torch

    from excise.io import read_json
    from excise.tasks.arithmetic import OPS, RETAIN_OPS
    from excise.organisms.arithmetic import PretrainConfig
    from excise.organisms.arithmetic import pretrain as _pretrain

    from excise.config import validate

    cfg = validate(PretrainConfig, dict(steps=steps, seed=seed, ops=list(RETAIN_OPS if oracle else OPS)), "command line")
    _check(out, **({"threads": threads} if threads is not None else {}))
    if threads:
        torch.set_num_threads(threads)
    p = _pretrain(cfg, out, name="oracle" if oracle else "base", progress=True)
    info = read_json(p / "pretrain.json")
    _console().print(f"model: {p}\naccuracy: " + ", ".join(f"{k} {v['value']:.3f}" for k, v in info["accuracy"].items()
                                                          if v["value"] is not None))


@app.command()
def unlearn(
    model: str = typer.Option(..., help="model directory or hub id (e.g. the output of `excise undo pretrain`)"),
    out: Path = typer.Option(..., help="directory for the unlearned model"),
    method: str = typer.Option("maxent", help="grad_ascent, grad_diff, maxent, npo or rmu"),
    steps: int = typer.Option(80, help="optimizer steps"),
    lr: float = typer.Option(1e-3, help="learning rate"),
    forget_file: Optional[Path] = typer.Option(None, help="JSONL forget items (default: generated mul/div)"),
    retain_file: Optional[Path] = typer.Option(None, help="JSONL retain items (default: generated add/sub)"),
    eval_n: int = typer.Option(50, help="dev-pool items per operation for the accuracy printed at the end"),
    seed: int = typer.Option(0, help="seed"),
) -> None:
    """Unlearn the forget operations with one method; saves the model and prints forget / retain accuracy (dev pool)."""
    from excise.config import validate
    from excise.intervene.unlearn_methods import UnlearnConfig, cycle
    from excise.intervene.unlearn_methods import unlearn as _unlearn
    from excise.organisms.arithmetic import load_model

    cfg = validate(UnlearnConfig, dict(method=method, steps=steps, lr=lr, seed=seed), "command line")
    _check(out, eval_n=eval_n)
    f = cycle(_items(forget_file, "forget", 2048, seed), seed)
    r = cycle(_items(retain_file, "retain", 2048, seed + 1), seed + 1)
    h = load_model(model)
    info: dict = {}
    log = _unlearn(h.model, h.tokenizer, f, r, cfg, progress=True, info=info)
    acc = _eval(h.model, h.tokenizer, eval_n, forget_file, retain_file)
    _write(out, h.model, h.tokenizer, {"stage": "unlearn", "from": model, "config": cfg.model_dump(), "steps": len(log),
                                        "accuracy": acc, "pool": "dev", **info})
    _console().print(f"unlearned model: {out}\naccuracy: {_show(acc)}")


@app.command()
def noise(
    model: str = typer.Option(..., help="the unlearned model to noise"),
    out: Path = typer.Option(..., help="directory for the noised model"),
    alpha: float = typer.Option(0.5, help="noise strength in [0, 1]"),
    beta: float = typer.Option(0.1, help="scale of the Xavier noise"),
    mask_from: str = typer.Option("global", help="global, paramdiff, fisher or snmf"),
    base: Optional[str] = typer.Option(None, help="the model before unlearning (paramdiff, fisher, snmf)"),
    top_p: float = typer.Option(0.1, help="fraction of each tensor / layer's neurons masked"),
    mode: str = typer.Option("binary", help="paramdiff/fisher mask: binary or relative"),
    forget_file: Optional[Path] = typer.Option(None, help="JSONL forget items for fisher / snmf"),
    retain_file: Optional[Path] = typer.Option(None, help="JSONL retain items for snmf"),
    seed: int = typer.Option(0, help="seed of the noise"),
) -> None:
    """Noise a model globally or inside a mask from a localizer (UNDO's N step)."""
    from excise.config import validate
    from excise.errors import ExciseError
    from excise.intervene.undo import NoiseConfig, apply_noise
    from excise.locate.paramdiff import mask_summary, param_masks
    from excise.organisms.arithmetic import load_model

    cfg = validate(NoiseConfig, dict(alpha=alpha, beta=beta, seed=seed), "command line")
    if mask_from not in ("global", "paramdiff", "fisher", "snmf"):
        raise ExciseError(f"unknown --mask-from '{mask_from}'; choose global, paramdiff, fisher or snmf")
    if mask_from != "global" and base is None:
        raise ExciseError(f"--mask-from {mask_from} needs --base (the model before unlearning)")
    if not 0 < top_p <= 1:
        raise ExciseError(f"--top-p must be in (0, 1], got {top_p}")
    if mode not in ("binary", "relative"):
        raise ExciseError(f"unknown --mode '{mode}'; choose binary or relative")
    _check(out)
    h = load_model(model)
    mask = None
    if mask_from != "global":
        b = load_model(base)
        if mask_from == "paramdiff":
            from excise.locate.paramdiff import param_diff_scores

            mask = param_masks(param_diff_scores(b.model, h.model), top_p=top_p, mode=mode)
        elif mask_from == "fisher":
            from excise.locate.fisher import fisher_scores

            mask = param_masks(fisher_scores(b.model, b.tokenizer, _items(forget_file, "forget", 256, seed)),
                               top_p=top_p, mode=mode)
        else:
            from excise.locate.snmf import neuron_param_masks, snmf_scores
            from excise.select import SelectConfig, select

            sc = snmf_scores(b, b.tokenizer, _items(forget_file, "forget", 256, seed), _items(retain_file, "retain", 256, seed))
            nm = select(sc, SelectConfig(method="topk", k=max(1, int(round(top_p * b.anatomy.d_mlp))), per_layer=True))
            mask = neuron_param_masks(h.model, nm.values)
    info = apply_noise(h.model, cfg, mask)
    if mask is not None:
        info.update(mask_summary(mask, h.model))
    _write(out, h.model, h.tokenizer, {"stage": "noise", "from": model, "mask_from": mask_from, **info})
    _console().print(f"noised model: {out} ({info['noised_fraction']:.3f} of parameters noised)")


@app.command()
def distill(
    teacher: str = typer.Option(..., help="the unlearned teacher"),
    student: str = typer.Option(..., help="the noised student (output of `excise undo noise`)"),
    out: Path = typer.Option(..., help="directory for the distilled model"),
    max_steps: int = typer.Option(400, help="step budget"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: DistillConfig's, cosine to its min_lr)"),
    forget_file: Optional[Path] = typer.Option(None, help="JSONL forget items (part of the mixed data)"),
    retain_file: Optional[Path] = typer.Option(None, help="JSONL retain items (mixed data; its check pool drives early stop)"),
    eval_n: int = typer.Option(50, help="dev-pool items per operation for the accuracy printed at the end"),
    seed: int = typer.Option(0, help="seed"),
) -> None:
    """Distill the teacher's outputs into the student (forward KL, all tokens), early stop on retain accuracy."""
    from excise.config import validate
    from excise.intervene.undo import DistillConfig
    from excise.intervene.undo import distill as _distill
    from excise.intervene.unlearn_methods import cycle
    from excise.measure.arithmetic import accuracy_by_op
    from excise.tasks.arithmetic import RETAIN_OPS, eval_items
    from excise.organisms.arithmetic import load_model

    cfg = validate(DistillConfig, dict(max_steps=max_steps, seed=seed, **({"lr": lr} if lr is not None else {})),
                   "command line")
    _check(out, eval_n=eval_n)
    mixed = _items(forget_file, "forget", 2048, seed) + _items(retain_file, "retain", 2048, seed + 1) \
        if (forget_file or retain_file) else _items(None, "mixed", 4096, seed)
    check = _items(retain_file, "retain", 0, 0, "check") if retain_file else \
        eval_items(RETAIN_OPS, cfg.eval_n_per_op, seed=seed, pool="check")  # early stop: never the test pool
    t, s = load_model(teacher), load_model(student)

    def retain_check(m):
        return accuracy_by_op(m, s.tokenizer, check)["retain"].value

    res = _distill(s.model, t.model, s.tokenizer, cycle(mixed, seed), cfg, retain_check=retain_check,
                   teacher_retain=retain_check(t.model), progress=True)
    acc = _eval(s.model, s.tokenizer, eval_n, forget_file, retain_file)
    _write(out, s.model, s.tokenizer, {"stage": "distill", "teacher": teacher, "student": student, **res, "accuracy": acc})
    _console().print(f"distilled model: {out}; {res['steps']} steps, {res['flops']:.2e} FLOPs, target reached: "
                     f"{res['reached']}\naccuracy: {_show(acc)}")


@app.command()
def relearn(
    model: str = typer.Option(..., help="the model to attack"),
    out: Path = typer.Option(..., help="directory for the attack's curves (relearn.json)"),
    data: str = typer.Option("forget", help="forget (forget-only) or mixed"),
    lrs: Optional[str] = typer.Option(None, help="comma-separated learning rates (default: RelearnConfig's 8, 1e-4 to 1e-2)"),
    steps: Optional[int] = typer.Option(None, help="steps per learning rate (default: RelearnConfig's)"),
    eval_n: Optional[int] = typer.Option(None, help="held-out (test-pool) forget items per operation for the curve"),
    forget_file: Optional[Path] = typer.Option(None, help="JSONL forget items for the attack"),
    seed: int = typer.Option(0, help="seed"),
) -> None:
    """Relearning attack: fine-tune on forget-only (or mixed) data across a learning-rate sweep."""
    import shutil

    from excise.attack.relearn_arithmetic import RelearnConfig
    from excise.attack.relearn_arithmetic import relearn as _relearn
    from excise.config import validate
    from excise.errors import ExciseError
    from excise.io import atomic_write_json
    from excise.resume import Points
    from excise.tasks.arithmetic import FORGET_OPS, eval_items
    from excise.organisms.arithmetic import load_model

    try:
        lr_list = [float(x) for x in lrs.split(",") if x.strip()] if lrs is not None else None
    except ValueError:
        raise ExciseError(f"--lrs must be comma-separated numbers, got '{lrs}'") from None
    given = {"lrs": lr_list, "steps": steps, "eval_n_per_op": eval_n}
    cfg = validate(RelearnConfig, dict(data=data, seed=seed, **{k: v for k, v in given.items() if v is not None}),
                   "command line")
    _check(out)
    items = _items(forget_file, "forget", 0, 0) if forget_file else None  # the attacker trains on the train pool
    held_out = _items(forget_file, "forget", 0, 0, "test") if forget_file else \
        eval_items(FORGET_OPS, cfg.eval_n_per_op, seed=2000 + seed)
    h = load_model(model)
    pts = Points(out / ".checkpoints" / "relearn")  # a killed sweep resumes at the learning rate it was in
    res = _relearn(h.model, h.tokenizer, cfg, eval_items=held_out, items=items, points=pts)
    atomic_write_json(out / "relearn.json", res)
    shutil.rmtree(out / ".checkpoints", ignore_errors=True)
    _console().print(f"relearn ({data}): AUC {res['auc']:.3f} (worst lr {res['worst_lr']}), steps to 50%: {res['steps_to_50']}")


@app.command("run")
def run_cmd(
    out: Path = typer.Option(Path("runs/robust_unlearn"), help="run directory"),
    config: Optional[Path] = typer.Option(None, help="recipe YAML (default: the packaged robust_unlearn.yaml)"),
    quick: bool = typer.Option(False, "--quick", help="one seed, fewer variants, shorter loops"),
    force: bool = typer.Option(False, "--force", help="overwrite a run directory holding another config"),
    set_: list[str] = SET,
) -> None:
    """The whole comparison: pretrain, unlearn, UNDO (global and targeted), relearn, report."""
    from excise.recipes.loader import run_recipe_file

    res = run_recipe_file(config or "robust_unlearn.yaml", out=out, force=force, quick=quick, console=_console(),
                          overrides=set_)
    _console().print(f"done: {res['dir']}")
