"""Stage-list recipes: ``measure -> locate -> select -> intervene -> measure -> compare`` from YAML.

A recipe names a model, a task source (:mod:`excise.recipes.sources`) and a list of stages, each
a one-key mapping to its settings::

    workflow: pipeline
    model: smollm2-135m-instruct
    task: {name: bbq, categories: [Age, SES]}
    stages:
      - measure: {}
      - locate: {method: fisher, unit: head}
      - select: {method: topk, k: 3, control: random}
      - intervene: {method: head_scale, scale: 0.0}
      - measure: {}
      - compare: {}

Any registered localizer feeds any intervention that accepts its unit kind; ``select.control:
random`` carries a random mask of the same size per layer through the same intervention, so the
localized method and its control are measured side by side. Every stage's settings are
validated before anything runs; each stage is a resumable folder of the run directory
(scores, masks and the weights an intervention changed are saved, so a re-run resumes).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator
from safetensors.torch import load_file, save_file

from excise.config import Device, validate
from excise.errors import ExciseError
from excise.intervene import INTERVENTIONS
from excise.io import atomic_write_csv, read_json
from excise.locate import LOCALIZERS
from excise.locate.saliency import random_mask_like
from excise.measure.frame import GroupedResult, compare
from excise.models import load
from excise.recipes.sources import TASKS
from excise.report.html import end_of_run
from excise.run import Run, seed_everything
from excise.select import Mask, SelectConfig, select
from excise.units import Scores

STAGE_KINDS = ("measure", "locate", "select", "intervene", "compare")


class SelectStage(SelectConfig):
    """A selection rule plus an optional control mask carried through the next intervention."""

    control: str | None = Field(None, description="random: also intervene on random units of equal count per layer")


class PipelineConfig(BaseModel):
    """A stage-list recipe."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("smollm2-135m-instruct", description="embedded default, local directory or hub id")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    seed: int = Field(0, description="one seed for data splits, localizers, training and bootstrap")
    task: dict[str, Any] = Field(..., description="the task source: {name: bbq|concept, ...its settings}")
    stages: list[dict[str, Any]] = Field(..., min_length=1, description="stage list, each {kind: settings}")

    @field_validator("stages")
    @classmethod
    def _one_key(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, st in enumerate(v):
            if not isinstance(st, dict) or len(st) != 1 or next(iter(st)) not in STAGE_KINDS:
                raise ValueError(f"stage {i} must be one of {', '.join(STAGE_KINDS)} mapped to its settings")
        return v


def _settings(raw: Any) -> dict[str, Any]:
    return dict(raw or {})


def plan(cfg: PipelineConfig, source: str = "recipe") -> list[tuple[str, str, Any]]:
    """Validate every stage before anything runs: [(folder name, kind, built object or config)]."""
    steps: list[tuple[str, str, Any]] = []
    last_kind: str | None = None
    for i, st in enumerate(cfg.stages):
        kind, raw = next(iter(st.items()))
        s = _settings(raw)
        where = f"{source}:stages.{i}.{kind}"
        if kind == "locate":
            obj: Any = LOCALIZERS.build(s.pop("method", None) or "", s, where)
            label = f"locate-{obj.name}"
        elif kind == "intervene":
            obj = INTERVENTIONS.build(s.pop("method", None) or "", s, where)
            label = f"intervene-{obj.name}"
        elif kind == "select":
            obj = validate(SelectStage, s, where)
            if obj.control not in (None, "random"):
                raise ExciseError(f"unknown control '{obj.control}'; choose random", where=where)
            if last_kind != "locate":
                raise ExciseError("a select stage must follow a locate stage", where=where)
            label = "select"
        elif kind == "measure" or kind == "compare":
            if s:
                raise ExciseError(f"{kind} takes no settings", where=where)
            obj, label = None, kind
        steps.append((f"{i + 1:02d}-{label}", kind, obj))
        last_kind = kind
    return steps


def _changed(base: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ref = base.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k not in ref or not torch.equal(ref[k], v)}


def _restore(base_handle: Any, path: Path) -> Any:
    model = copy.deepcopy(base_handle.model)
    model.load_state_dict(load_file(str(path)), strict=False)
    return base_handle.with_model(model)


def run_pipeline(cfg: PipelineConfig, out: str | Path, *, force: bool = False, console: Any = None,
                 source: str = "recipe") -> dict:
    """Run (or resume) a stage-list recipe; returns the measured results and the comparison rows."""
    task_cfg = dict(cfg.task)
    task = TASKS.build(task_cfg.pop("name", None) or "", task_cfg, f"{source}:task")
    steps = plan(cfg, source)
    run = Run(out, {"workflow": "pipeline", **cfg.model_dump()}, force=force)
    seed_everything(cfg.seed)
    base = load(cfg.model, device=cfg.device, dtype=cfg.dtype, attn_implementation="eager")
    data = task.build(base, cfg.seed)
    data.check_disjoint()
    variants: dict[str, Any] = {"base": base}
    scores: Scores | None = None
    masks: dict[str, Mask] = {}
    results: dict[str, dict[str, GroupedResult]] = {}

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)

    for folder, kind, obj in steps:
        say(f"[{folder}]")
        if kind == "measure":
            def stage(d: Path) -> dict:
                out_ = {}
                for name, h in variants.items():
                    res = data.evaluate(h)
                    res.save(d, name)
                    out_[name] = {m: e.value for m, e in res.overall.items()}
                return out_

            r = run.stage(folder, stage)
            results[folder] = {n: GroupedResult.from_dict(read_json(r.dir / f"{n}.json")) for n in variants}
        elif kind == "locate":
            def stage(d: Path) -> dict:
                sc = obj.score(base, data.build)
                sc.save(str(d / "scores.safetensors"))
                return {"kind": sc.kind, "method": sc.method}

            r = run.stage(folder, stage)
            scores = Scores.load(str(r.dir / "scores.safetensors"))
        elif kind == "select":
            def stage(d: Path) -> dict:
                m = select(scores, SelectConfig(**obj.model_dump(exclude={"control"})))
                found = {"localized": m}
                if obj.control == "random":
                    found["random"] = random_mask_like(m, seed=cfg.seed)
                save_file({k: v.values.to(torch.uint8) for k, v in found.items()}, str(d / "masks.safetensors"),
                          metadata={"kind": m.kind})
                return {"kind": m.kind, "n_selected": m.n_selected, "units": [list(u) for u in m.units()][:64]}

            r = run.stage(folder, stage)
            raw = load_file(str(r.dir / "masks.safetensors"))
            masks = {k: Mask(scores.kind, v.bool()) for k, v in raw.items()}
        elif kind == "intervene":
            todo = masks or {"unlocalized": None}

            def stage(d: Path) -> dict:
                info = {}
                for name, m in todo.items():
                    h = obj.apply(base, m, data.build)
                    changed = _changed(base.model, h.model)
                    save_file(changed, str(d / f"{name}.safetensors"))
                    info[name] = {"n_tensors_changed": len(changed),
                                  "n_selected": None if m is None else m.n_selected}
                return info

            r = run.stage(folder, stage)
            variants = {name: _restore(base, r.dir / f"{name}.safetensors") for name in todo}
        else:  # compare: the first measured results against the last, side by side
            def stage(d: Path) -> dict:
                keys = list(results)
                if len(keys) < 2:
                    raise ExciseError("compare needs two measure stages before it")
                first, last = results[keys[0]]["base"], results[keys[-1]]
                rows = [{"variant": n, **row} for n, res in last.items() for row in compare(first, res)]
                atomic_write_csv(d / "comparison.csv", rows)
                return {n: {m: {"before": first.overall[m].value, "after": res.overall[m].value}
                            for m in res.overall if m in first.overall} for n, res in last.items()}

            r = run.stage(folder, stage)
            say(_table(r.metrics))
    return {"dir": str(run.dir), "results": {k: {n: v.as_dict() for n, v in r_.items()} for k, r_ in results.items()},
            "report_html": end_of_run(run.dir, console)}


def _table(metrics: dict) -> str:
    lines = [f"{'variant':<14} {'metric':<26} {'before':>10} {'after':>10}"]
    for n, ms in (metrics or {}).items():
        for m, v in ms.items():
            b, a = v["before"], v["after"]
            lines.append(f"{n:<14} {m:<26} {b if b is None else round(b, 4)!s:>10} {a if a is None else round(a, 4)!s:>10}")
    return "\n".join(lines)


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    cfg = validate(PipelineConfig, settings, source)
    return run_pipeline(cfg, out, force=force, console=console, source=source)
