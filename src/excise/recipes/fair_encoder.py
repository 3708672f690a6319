"""Fair encoders: data -> frozen baselines -> plain LoRA -> fair LoRA -> report, one resumable run.

Stages (folders of the run directory):

* ``data``: the task's train / validation / test splits (counts per label x group, disjoint ids).
* ``baselines``: the frozen encoder's mean-pooled embeddings; a logistic probe and Fairlearn's
  ExponentiatedGradient / ThresholdOptimizer (equalized odds), each scored on the test split;
  Grep-BiasIR counterfactual matching of the frozen encoder ("before").
* ``plain``: LoRA fine-tuning without fairness terms (the baseline a user would pick), checkpoint
  with the best validation utility, temperature-scaled and thresholded on validation.
* ``fair``: LoRA with the configured fairness terms; the checkpoint is chosen by window
  selection (most useful among those whose validation gap is under the threshold, or the
  stated fallback), calibrated the same way, exported as a PEFT adapter with its heads and card.
* ``report``: every method side by side on the test split (n and 95% CIs), the Pareto plot, the
  checkpoints' validation plot, calibration curves and the counterfactual before/after table.

Three pools: training items build the models, validation items choose checkpoints, temperature
and threshold, and only test items are reported on (``data`` proves the three are disjoint).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from excise.config import validate
from excise.errors import ExciseError
from excise.intervene.fair_baselines import run_baselines
from excise.intervene.fair_export import export, load_epoch
from excise.intervene.fair_finetune import FairFinetuneConfig, embed, fair_finetune, predict
from excise.intervene.fair_select import best_fairness, best_util, select_window
from excise.io import atomic_write_json, read_json
from excise.measure.calibration import apply_temperature, calibration_curve_data, temperature_scale, tune_threshold
from excise.measure.counterfactual import cosine, counterfactual_matching
from excise.measure.fairness import fairness_report
from excise.measure.frame import GroupedResult
from excise.models import load
from excise.models.defaults import DEFAULTS
from excise.recipes.fair_config import FairEncoderConfig, quick_variant
from excise.recipes.fair_report import write_report
from excise.report.html import end_of_run
from excise.run import Run, seed_everything
from excise.tasks.fairness import load_bug, load_grep_biasir, load_hf, load_table


def load_data(cfg: FairEncoderConfig) -> Any:
    """The configured task, split into train / validation / test (seeded, stratified by label x group)."""
    if cfg.data == "bug":
        return load_bug(cap_per_class=cfg.cap_per_class, seed=cfg.seed, binary=cfg.binary)
    u = cfg.user_data
    cols = dict(text=u.text, label=u.label, groups=u.groups, text_pair=u.text_pair)
    table = load_hf(u.path, u.split, **cols) if u.hf else load_table(u.path, **cols)
    return table.split(u.fractions, cfg.seed)


def _subsample(xs: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    xs = sorted(xs, key=lambda e: e.id)
    return xs if n is None or n >= len(xs) else sorted(random.Random(seed).sample(xs, n), key=lambda e: e.id)


def _y(xs: Sequence[Any]) -> np.ndarray:
    return np.array([e.label for e in xs])


def _g(xs: Sequence[Any], attr: str) -> np.ndarray:
    return np.array([str(e.groups[attr]) for e in xs])


def _grep_sims(encode: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Cosine of each Grep-BiasIR query to its relevant and non-relevant document, feminine and masculine versions."""
    qs = load_grep_biasir()
    docs = [(q.relevant, q.nonrelevant) for q in qs]
    texts = [q.query for q in qs]
    for rel, non in docs:
        for version in ("feminine", "masculine"):
            texts += [rel.get(version) or "", non.get(version) or ""]
    emb = encode(texts)
    qe, de = emb[: len(qs)], emb[len(qs):].reshape(len(qs), 2, 2, -1)  # [Q, version, rel/non, d]
    sims = cosine(qe[:, None, None, :], de)  # [Q, 2, 2]
    for i, (rel, non) in enumerate(docs):  # a missing document version is NaN, not a similarity to ""
        for v, version in enumerate(("feminine", "masculine")):
            for j, d in enumerate((rel, non)):
                if not d.get(version):
                    sims[i, :, j] = np.nan
    mask = np.tile(np.array([[True, False]]), (len(qs), 1))
    return sims[:, 0], sims[:, 1], mask, [q.category for q in qs]


def _counterfactual(encode: Callable[[list[str]], np.ndarray], cfg: FairEncoderConfig) -> GroupedResult:
    fem, masc, rel, cats = _grep_sims(encode)
    return counterfactual_matching(fem, masc, relevant_mask=rel, groups=cats, n_boot=cfg.n_boot, seed=cfg.seed)


def _fe_encoder(fe: Any) -> Callable[[list[str]], np.ndarray]:
    """Texts -> the fine-tuned encoder's L2-normalised pooled embeddings (as the frozen path computes them)."""
    def encode(texts: list[str]) -> np.ndarray:
        out = []
        fe.eval()
        with torch.inference_mode():
            for s in range(0, len(texts), 64):
                batch = fe.collate([_Text(t) for t in texts[s:s + 64]], targets=False)
                z = fe.embed_batch(batch).float()
                out.append(torch.nn.functional.normalize(z, dim=-1).cpu().numpy())
        return np.concatenate(out)

    return encode


class _Text:
    def __init__(self, text: str):
        self.text, self.text_pair = text, None


def _score(fe: Any, val: Sequence[Any], test: Sequence[Any], attr: str, labels: Sequence[str], cfg: FairEncoderConfig,
           d: Path) -> tuple[GroupedResult, dict]:
    """Temperature and threshold from validation, then the test report."""
    lv, _ = predict(fe, val)
    temp = temperature_scale(lv, _y(val))
    pv = apply_temperature(lv, temp)
    lt, _ = predict(fe, test)
    pt = apply_temperature(lt, temp)
    info: dict[str, Any] = {"temperature": temp}
    if len(labels) == 2:
        thr = tune_threshold(_y(val), pv[:, 1], groups=_g(val, attr), balanced=cfg.balanced_threshold)
        pred, prob = (pt[:, 1] >= thr).astype(int), pt[:, 1]
        info["threshold"] = thr
    else:
        pred, prob = pt.argmax(1), pt
    rep = fairness_report(_y(test), pred, prob, _g(test, attr), label_names=list(labels), n_boot=cfg.n_boot,
                          seed=cfg.seed, group_by=attr)
    rep.meta.update(info)
    rep.save(d, "test")
    curve = calibration_curve_data(_y(test), prob)
    atomic_write_json(d / "calibration.json", curve.as_dict())
    return rep, info


def _train(handle: Any, name: str, fcfg: FairFinetuneConfig, splits: dict, cfg: FairEncoderConfig, d: Path,
           choose: Callable[[list[dict]], Any], console: Any) -> tuple[Any, dict]:
    train, val, test, attr, labels = splits["train"], splits["val"], splits["test"], splits["attr"], splits["labels"]
    res = fair_finetune(handle, train, val, fcfg.model_copy(update={"attribute": attr}), directory=d / "train",
                        classes=range(len(labels)), progress=console is not None)
    sel = choose(res.history)
    if sel.epoch is None:
        raise ExciseError(f"{name}: no checkpoint could be selected ({sel.reason})")
    load_epoch(res.model, d / "train", sel.epoch)
    rep, info = _score(res.model, val, test, attr, labels, cfg, d)
    m = {"selected_epoch": sel.epoch, "selection": sel.reason, "seconds": round(res.seconds, 1),
         "n_trainable": res.n_trainable, **info, "test": {k: e.value for k, e in rep.overall.items()},
         "differences": {k: e.value for k, e in rep.differences.items()}}
    if cfg.counterfactual:
        _counterfactual(_fe_encoder(res.model), cfg).save(d, "counterfactual")
    return res.model, m


def _window(cfg: FairEncoderConfig) -> Callable[[list[dict]], Any]:
    s, util, fair = cfg.selection, cfg.fair.utility_metric, cfg.fair.fairness_metric

    def choose(history: list[dict]) -> Any:
        useful = [r for r in history if (r.get(util) or 0.0) >= s.min_utility]
        sel = select_window(useful, start=s.start, end=min(s.end, cfg.fair.epochs), threshold=s.threshold,
                            utility=util, fairness=fair)
        if sel.epoch is not None:
            return sel
        if len(useful) < len(history):
            sel = dataclasses.replace(sel, reason=f"{sel.reason} ({len(history) - len(useful)} checkpoints below "
                                                   f"{util} {s.min_utility:g} left out)")
        fb = (best_fairness(history, fair, util) if s.fallback == "best_fairness" else best_util(history, util, fair))
        return dataclasses.replace(fb, reason=f"window: {sel.reason}; fallback {s.fallback}: {fb.reason}")

    return choose


def run_fair(cfg: FairEncoderConfig, out: str | Path, *, force: bool = False, console: Any = None,
             stop_after: str | None = None) -> dict:
    """Run (or resume) the workflow; ``stop_after`` ends it after that stage (train, eval, compare)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(out, {"workflow": "fair", **cfg.model_dump(mode="json")}, force=force)
    seed_everything(cfg.seed)
    data = load_data(cfg)  # the user's table is checked before the model is loaded
    handle = load(cfg.model, kind="encoder", device=cfg.device)
    attr = data.attributes[0]
    splits = {"train": _subsample(data.train, cfg.train_limit, cfg.seed),
              "val": _subsample(data.val, cfg.val_limit, cfg.seed + 1), "test": list(data.test), "attr": attr,
              "labels": list(data.label_names)}
    out_: dict[str, Any] = {"dir": str(run.dir)}

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, markup=False, highlight=False)

    def st_data(d: Path) -> dict:
        ids = {k: {e.id for e in splits[k]} for k in ("train", "val", "test")}
        if ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"]:
            raise ExciseError("train, validation and test splits share items")  # pragma: no cover - split guarantees
        counts = {k: {"n": len(splits[k]), "by_label_group": _counts(splits[k], attr, splits["labels"])}
                  for k in ("train", "val", "test")}
        task = cfg.user_data.path if cfg.data == "user" else ("BUG binary" if cfg.binary else "BUG professions")
        return {"task": task, "attribute": attr,
                "labels": splits["labels"], "splits": counts, "built": data.meta.get("built")}

    def st_baselines(d: Path) -> dict:
        tr, va, te = splits["train"], splits["val"], splits["test"]
        x = {k: embed(handle, [e.text for e in xs]) for k, xs in (("train", tr), ("val", va), ("test", te))}
        preds, skipped = run_baselines(x["train"], _y(tr), _g(tr, attr), x["val"], _y(va), _g(va, attr), x["test"],
                                       _g(te, attr), cfg.baselines.model_copy(update={"seed": cfg.seed}))
        m: dict[str, Any] = {"skipped": skipped, "methods": {}}
        for i, p in enumerate(preds):
            rep = fairness_report(_y(te), p.y_pred, p.y_prob, _g(te, attr), label_names=splits["labels"],
                                  n_boot=cfg.n_boot, seed=cfg.seed, group_by=attr)
            rep.meta.update({"method": p.name, **p.info})
            rep.save(d, f"baseline_{i}")
            m["methods"][p.name] = {"file": f"baseline_{i}.json", **{k: e.value for k, e in rep.differences.items()
                                                                     if k in ("eo_diff", "dp_diff")},
                                    "macro_f1": rep.overall["macro_f1"].value}
        if cfg.counterfactual:
            _counterfactual(lambda t: embed(handle, t), cfg).save(d, "counterfactual")
        return m

    stages = [("data", st_data), ("baselines", st_baselines),
              ("plain", lambda d: _train(handle, "plain", cfg.plain, splits, cfg, d,
                                         lambda h: best_util(h, cfg.plain.utility_metric, cfg.plain.fairness_metric),
                                         console)[1]),
              ("fair", lambda d: _fair_stage(handle, splits, cfg, d, console, run.stage_dir("fair"))),
              ("report", lambda d: write_report(run.dir, d, cfg))]
    out_.update(run.run_stages(stages, say=say, stop_after=stop_after))
    if "report" in out_:
        say((run.stage_dir("report") / "report.md").read_text(encoding="utf-8"))
    out_["report_html"] = end_of_run(run.dir, console)
    return out_


def _fair_stage(handle: Any, splits: dict, cfg: FairEncoderConfig, d: Path, console: Any, final: Path) -> dict:
    """The fair model, selected, exported; ``final`` is where the stage's folder ``d`` ends up."""
    fe, m = _train(handle, "fair", cfg.fair, splits, cfg, d, _window(cfg), console)
    base = DEFAULTS[cfg.model].hub_id if cfg.model in DEFAULTS else cfg.model
    what = (f"BUG ({'binary framing' if cfg.binary else '12 professions'}), profession word masked"
            if cfg.data == "bug" else f"user data {cfg.user_data.path}")
    card = {"data": f"{what}, protected attribute {splits['attr']}; trained on {len(splits['train'])} items",
            "metrics": {"test macro-F1": m["test"].get("macro_f1"), "test EO difference": m["differences"].get("eo_diff"),
                        "selected epoch": m["selected_epoch"], "selection": m["selection"]},
            "limits": "BUG's gender labels follow the pronoun; 49% of nurse sentences are biomedical text; one "
                      "protected attribute; English only; fairness measured on this task's test split only."}
    export(fe, d / "export", base_name=base, card=card)
    m["export"] = str(final / "export")  # not the temporary folder: it is renamed when the stage ends
    return m


def _counts(xs: Sequence[Any], attr: str, labels: Sequence[str]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for e in xs:
        cell = out.setdefault(labels[e.label], {})
        cell[str(e.groups[attr])] = cell.get(str(e.groups[attr]), 0) + 1
    return out


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    cfg = validate(FairEncoderConfig, settings, source)
    return run_fair(quick_variant(cfg) if quick else cfg, out, force=force, console=console)


def load_result(run_dir: str | Path, stage: str, name: str = "test") -> GroupedResult:
    """A stage's saved GroupedResult (e.g. ``fair/test.json``) from a finished run."""
    p = Path(run_dir) / stage / f"{name}.json"
    if not p.exists():
        raise ExciseError(f"no result '{name}' in stage '{stage}' (has the run finished it?)", where=str(p))
    return GroupedResult.from_dict(read_json(p))
