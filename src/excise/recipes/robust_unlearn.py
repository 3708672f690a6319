"""Workflow `undo`: robust unlearning on arithmetic — baselines, UNDO, targeted UNDO, relearning.

Stages of a run directory (each atomic and resumable):

* ``models``: pretrain (or reuse from the cache) the base model on + - * / and the oracle on
  + - only; their accuracy per operation.
* ``seed{s}-unlearn``: every unlearning method applied to the base (GradAscent, GradDiff,
  MaxEnt, NPO, RMU); saved models and forget / retain accuracy.
* ``seed{s}-undo``: the teacher (``undo_from`` method's model) noised globally at each alpha
  and with each targeted mask (parameter difference, SNMF, Fisher), then distilled back;
  steps, tokens and estimated FLOPs of distillation.
* ``seed{s}-relearn``: the relearning attack (learning-rate sweep) on every model, including
  oracle and base.
* ``report``: per model, mean over seeds with 95% CIs of forget / retain accuracy,
  distillation compute and relearning robustness; ``comparison.csv``, ``comparison.md`` and
  ``tradeoff.png`` (distillation compute vs relearning robustness).

``quick`` runs one seed, fewer variants and shorter loops (the smoke test of the workflow).

Settings live in :mod:`excise.recipes.robust_config`, the report stage in
:mod:`excise.recipes.robust_report`; this module runs the stages.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from excise.attack.relearn_arithmetic import relearn
from excise.config import validate
from excise.errors import ExciseError
from excise.intervene.undo import NoiseConfig, apply_noise, distill
from excise.intervene.unlearn_methods import METHODS, cycle, unlearn
from excise.io import read_json
from excise.locate.fisher import fisher_scores
from excise.locate.paramdiff import mask_summary, param_diff_scores, param_masks
from excise.locate.snmf import neuron_param_masks, snmf_scores
from excise.measure.arithmetic import accuracy_by_op
from excise.organisms.arithmetic import load_model, pretrain
from excise.recipes.robust_config import RobustUnlearnConfig, quick_variant
from excise.recipes.robust_report import build_report
from excise.report.html import end_of_run
from excise.resume import Points, link_tree
from excise.run import Run, seed_everything
from excise.select import SelectConfig, select
from excise.tasks.arithmetic import FORGET_OPS, OPS, RETAIN_OPS, Item, eval_items, load_items, split_pools, train_stream

__all__ = ["RobustUnlearnConfig", "run_robust_unlearn", "run_recipe"]


# --- helpers ------------------------------------------------------------------------------

def evaluate(model: Any, tokenizer: Any, items: list) -> dict:
    return {k: v.as_dict() for k, v in accuracy_by_op(model, tokenizer, items).items()}


class Data:
    """Forget / retain item sources: the packaged generator, or a user's JSONL files.

    Items come from disjoint pools (:data:`excise.tasks.arithmetic.POOLS`): training streams from
    ``train``, the distillation early stop from ``check``, every reported number from ``test``.
    """

    def __init__(self, cfg: RobustUnlearnConfig):
        self.files = bool(cfg.forget_file or cfg.retain_file)
        if self.files:
            if not (cfg.forget_file and cfg.retain_file):
                raise ExciseError("give both forget_file and retain_file (or neither)", where="config:forget_file")
            # rows are checked as given (a retain row in the forget file fails with file:line:op), then
            # ops the task does not know ("custom") are grouped by the file they came from
            f = load_items(cfg.forget_file, group="forget")
            r = load_items(cfg.retain_file, group="retain")
            f = [Item(it.prompt, it.answer, it.op if it.op in FORGET_OPS else "mul", it.kind) for it in f]
            r = [Item(it.prompt, it.answer, it.op if it.op in RETAIN_OPS else "add", it.kind) for it in r]
            fp, rp = split_pools(f), split_pools(r)
            self.pools = {k: fp[k] + rp[k] for k in fp}
            self.f_train, self.r_train = fp["train"], rp["train"]
        self.cfg = cfg

    def stream(self, group: str, seed: int):
        if self.files:
            pool = {"forget": self.f_train, "retain": self.r_train, "mixed": self.f_train + self.r_train}[group]
            return cycle(pool, seed)
        return train_stream({"forget": FORGET_OPS, "retain": RETAIN_OPS, "mixed": OPS}[group], seed)

    def train(self, group: str, n: int, seed: int) -> list:
        s = self.stream(group, seed)
        return [next(s) for _ in range(n)]

    def eval(self, n_per_op: int, seed: int = 0, ops: tuple[str, ...] | None = None, pool: str = "test") -> list:
        if self.files:
            return [it for it in self.pools[pool] if ops is None or it.op in ops]
        return eval_items(ops or OPS, n_per_op, seed=seed, pool=pool)


def _save(model: Any, tokenizer: Any, d: Path) -> None:
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tiny model is noise
    try:
        model.save_pretrained(d, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(d)


def _load(path: Path) -> Any:
    return load_model(path)


# --- the workflow -------------------------------------------------------------------------

def run_robust_unlearn(cfg: RobustUnlearnConfig, out: str | Path, *, force: bool = False, console: Any = None,
                       quick: bool = False) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.undo_from not in cfg.methods:
        raise ExciseError(f"undo_from '{cfg.undo_from}' is not one of the methods ({', '.join(cfg.methods)})",
                          where="config:undo_from")
    # checkpoint_every changes no result, so a run killed with one interval resumes with another
    run = Run(out, {"workflow": "undo", "quick": quick, **cfg.model_dump(mode="json", exclude={"checkpoint_every"})},
              force=force)
    data = Data(cfg)
    t_start = time.time()

    def say(msg: str) -> None:
        if console is not None:
            console.print(f"[{time.time() - t_start:6.0f}s] {msg}")

    # -- models
    def stage_models(d: Path) -> dict:
        out_ = {}
        if cfg.model:
            h = load_model(cfg.model)
            out_["base"] = {"path": str(cfg.model), "accuracy": evaluate(h.model, h.tokenizer, data.eval(cfg.eval_n_per_op))}
            return out_
        for name, pc in (("base", cfg.pretrain),
                         ("oracle", cfg.pretrain.model_copy(update={"ops": list(RETAIN_OPS)}))):
            say(f"pretraining {name} (cached after the first time)")
            p = pretrain(pc, name=name, progress=console is not None)
            h = load_model(p)
            info = read_json(p / "pretrain.json")
            out_[name] = {"path": str(p), "pretrain_seconds": info["seconds"], "tokens_seen": info["tokens_seen"],
                          "n_params": info["n_params"],
                          "accuracy": evaluate(h.model, h.tokenizer, data.eval(cfg.eval_n_per_op))}
        return out_

    models = run.stage("models", stage_models).metrics
    say(f"base accuracy: { {k: round(v['value'], 3) for k, v in models['base']['accuracy'].items() if v['value'] is not None} }")
    base = _load(Path(models["base"]["path"]))
    tok = base.tokenizer
    ev = data.eval(cfg.eval_n_per_op)
    base_retain = models["base"]["accuracy"]["retain"]["value"]

    for seed in cfg.seeds:
        # -- unlearning
        def stage_unlearn(d: Path, seed=seed) -> dict:
            # each finished method (model and row) is kept, and training checkpoints too when asked
            # for, so a killed run resumes where it was (excise.resume)
            pts = Points(run.checkpoint_dir(f"seed{seed}-unlearn"))
            rows = {}
            for name, mc in cfg.methods.items():
                row, src = pts.get(name), pts.folder_path(name)
                if row is None or not src.is_dir():
                    seed_everything(seed)
                    m = copy.deepcopy(base.model)
                    mc = mc.model_copy(update={"seed": seed})
                    t0 = time.time()
                    info: dict = {}
                    log = unlearn(m, tok, data.stream("forget", seed), data.stream("retain", seed + 1), mc, info=info,
                                  checkpoint_dir=pts.dir / f"train-{name}", checkpoint_every=cfg.checkpoint_every)
                    acc = evaluate(m, tok, ev)
                    src = pts.folder(name, lambda t, m=m: _save(m, tok, t))
                    row = pts.put(name, {"kind": "unlearn", "steps": len(log), "tokens": sum(r["tokens"] for r in log),
                                         "seconds": round(time.time() - t0, 1), "accuracy": acc, **info})
                    pts.remove(f"train-{name}")
                link_tree(src, d / name)
                rows[name] = row
                acc = row["accuracy"]
                say(f"seed {seed} {name}: forget {acc['forget']['value']:.3f} retain {acc['retain']['value']:.3f}")
            return rows

        unl = run.stage(f"seed{seed}-unlearn", stage_unlearn)

        # -- UNDO
        def stage_undo(d: Path, seed=seed) -> dict:
            teacher = _load(run.stage_dir(f"seed{seed}-unlearn") / cfg.undo_from)
            check_items = data.eval(cfg.distill.eval_n_per_op, seed=seed, pool="check")  # never the test pool

            def retain_check(m):
                return accuracy_by_op(m, tok, [it for it in check_items if it.op in RETAIN_OPS])["retain"].value

            def forget_check(m):
                return accuracy_by_op(m, tok, [it for it in check_items if it.op in FORGET_OPS])["forget"].value

            teacher_retain = retain_check(teacher.model)
            f_items = data.train("forget", cfg.localize_n, 20_000 + seed)
            r_items = data.train("retain", cfg.localize_n, 30_000 + seed)
            variants: list[tuple[str, float, Any, dict]] = [(f"undo-global-a{a:g}", a, None, {}) for a in cfg.alphas]
            for t in cfg.targeted:
                if t.localizer == "paramdiff":
                    sc = param_diff_scores(base.model, teacher.model)
                    mask = param_masks(sc, top_p=t.top_p, mode=t.mode)
                elif t.localizer == "fisher":
                    sc = fisher_scores(copy.deepcopy(base.model), tok, f_items, loss_on="answer", retain_items=r_items,
                                       retain_weight=t.retain_weight)
                    mask = param_masks(sc, top_p=t.top_p, mode=t.mode)
                else:
                    sc = snmf_scores(base, tok, f_items, r_items, cfg.snmf.model_copy(update={"seed": seed}))
                    k = max(1, int(round(t.top_p * base.anatomy.d_mlp)))
                    nm = select(sc, SelectConfig(method="topk", k=k, per_layer=True))
                    mask = neuron_param_masks(base.model, nm.values)
                variants.append((t.name, t.alpha, mask, {"localizer": t.localizer, **mask_summary(mask, base.model)}))
            rows = {}
            for name, alpha, mask, info in variants:
                seed_everything(seed)
                student = copy.deepcopy(teacher.model)
                nz = apply_noise(student, NoiseConfig(alpha=alpha, beta=cfg.beta, seed=seed), mask)
                after_noise = evaluate(student, tok, ev)
                dc = cfg.distill.model_copy(update={"seed": seed})
                res = distill(student, teacher.model, tok, data.stream("mixed", 40_000 + seed), dc,
                              retain_check=retain_check, teacher_retain=teacher_retain, forget_check=forget_check)
                acc = evaluate(student, tok, ev)
                _save(student, tok, d / name)
                rows[name] = {"kind": "undo-targeted" if mask is not None else "undo-global", "alpha": alpha,
                              "noise": {**nz, **info}, "after_noise": after_noise, "distill_steps": res["steps"],
                              "distill_tokens": res["tokens"], "distill_flops": res["flops"], "reached": res["reached"],
                              "distill_curve": res["curve"], "teacher_retain": teacher_retain, "accuracy": acc}
                say(f"seed {seed} {name}: distill {res['steps']} steps, forget {acc['forget']['value']:.3f} "
                    f"retain {acc['retain']['value']:.3f}")
            return rows

        undo = run.stage(f"seed{seed}-undo", stage_undo)

        # -- relearning
        def stage_relearn(d: Path, seed=seed) -> dict:
            pts = Points(run.checkpoint_dir(f"seed{seed}-relearn"))  # finished (model, lr) points are kept
            rc = cfg.relearn.model_copy(update={"seed": seed})
            r_eval = data.eval(rc.eval_n_per_op, seed=2000 + seed, ops=FORGET_OPS)  # held-out forget items (test pool)
            attack = data.train("forget", rc.n_items, 50_000 + seed) if data.files else None
            paths = {"base": Path(models["base"]["path"])}
            if "oracle" in models:
                paths["oracle"] = Path(models["oracle"]["path"])
            paths.update({n: run.stage_dir(f"seed{seed}-unlearn") / n for n in unl.metrics})
            paths.update({n: run.stage_dir(f"seed{seed}-undo") / n for n in undo.metrics})
            rows = {}
            for name, p in paths.items():
                rows[name] = pts.cached(name, lambda p=p, name=name: relearn(
                    _load(p).model, tok, rc, eval_items=r_eval, items=attack, points=pts, prefix=f"{name}@"))
                say(f"seed {seed} relearn {name}: auc {rows[name]['auc']:.3f} steps_to_50 {rows[name]['steps_to_50']}")
            return rows

        run.stage(f"seed{seed}-relearn", stage_relearn)

    def stage_report(d: Path) -> dict:
        return build_report(run, cfg, models, d, base_retain)

    rep = run.stage("report", stage_report)
    say(f"report: {run.stage_dir('report')}")
    return {"dir": str(run.dir), "metrics": rep.metrics, "seconds": round(time.time() - t_start, 1),
            "report_html": end_of_run(run.dir, console)}


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    cfg = validate(RobustUnlearnConfig, settings, source)
    for name, m in cfg.methods.items():
        if m.method not in METHODS:  # pragma: no cover - pydantic already checks
            raise ValueError(name)
    if quick:
        cfg = quick_variant(cfg)
    return run_robust_unlearn(cfg, out, force=force, console=console, quick=quick)
