"""Causal ground truth for BBQ localization, and cheap localizers scored against it.

Where weights were changed is not where a behaviour lives: fine-tuning spreads a bias over the
model, and a planted implant need not be used (design note 10). Ground truth here is *measured*:
every unit -- each attention head (``attn.L.z`` slice, zeroed) or each layer's MLP output
(``mlp.L.out``, zeroed) -- is really ablated, and the drop of the biased-answer log-odds is
recorded per held-out ambiguous item (:func:`ablation_truth`). Units are ranked by the mean drop.

Cheap localizers (:func:`cheap_views`, one forward and backward pass per batch of pairs) are then
scored against that ranking by precision@k (how many of their top-k units are among the k units
with the largest measured effect) and Spearman correlation over all units, each with a bootstrap
CI over the truth items (:func:`score_against_truth`). The localizers run on *selection* pairs
that share no item with the truth items, so their score is not inflated by reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats as sstats
from tqdm.auto import tqdm

from excise.io import atomic_write_csv
from excise.locate.heads import _pass, _pearson, mean_logodds, pair_items
from excise.measure.stats import Estimate, bootstrap, mean_ci
from excise.sites import Edit
from excise.trace import Trace

UnitKind = Literal["head", "mlp"]
CHEAP = ("correlation", "attribution_patching", "activation_norm")


@dataclass
class AblationTruth:
    """Per-item measured effects: ``effects[i, u]`` = biased log-odds of item i minus its log-odds
    with unit u ablated (positive: the unit pushes towards the stereotyped answer)."""

    kind: str
    units: list[tuple[int, int]]  # (layer, head); (layer, 0) for MLP layers
    effects: np.ndarray  # [N, U]
    base: np.ndarray  # [N] biased log-odds without ablation

    @property
    def means(self) -> np.ndarray:
        return self.effects.mean(0)

    def ranking(self) -> list[int]:
        return list(np.argsort(-self.means, kind="stable"))

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for rank, u in enumerate(self.ranking(), start=1):
            e = mean_ci(self.effects[:, u])
            l, h = self.units[u]
            out.append({"rank": rank, "kind": self.kind, "layer": l, "head": h if self.kind == "head" else "",
                        "effect": e.value, "lo": e.lo, "hi": e.hi, "n": e.n})
        return out

    def save(self, directory: str | Path, name: str) -> None:
        d = Path(directory)
        atomic_write_csv(d / f"{name}.csv", self.rows())
        np.save(d / f"{name}_effects.npy", self.effects)  # small; the report reads the CSV


def unit_list(anatomy: Any, kind: UnitKind) -> list[tuple[int, int]]:
    if kind == "head":
        return [(l, h) for l in range(anatomy.n_layers) for h in range(anatomy.n_heads)]
    return [(l, 0) for l in range(anatomy.n_layers)]


def unit_edit(kind: UnitKind, unit: tuple[int, int]) -> Edit:
    l, h = unit
    return Edit(f"attn.{l}.z", "zero", heads=[h]) if kind == "head" else Edit(f"mlp.{l}.out", "zero")


def ablation_truth(handle: Any, items: Sequence[Any], kind: UnitKind = "head", *, batch_size: int = 8,
                   progress: bool = False) -> AblationTruth:
    """Ablate every unit of ``kind`` in turn and record each item's drop of biased log-odds.
    ``items``: ambiguous BBQ items with a bias target (held out from anything that chose units)."""
    items = [x for x in items if x.context_condition == "ambig" and x.target_loc is not None]
    if not items:
        raise ValueError("ablation truth needs ambiguous items with a bias target")
    base = mean_logodds(handle, items, batch_size)
    units = unit_list(handle.anatomy, kind)
    effects = np.zeros((len(items), len(units)))
    it = enumerate(units)
    if progress:
        it = tqdm(list(it), desc=f"ablating every {kind}", unit=kind)
    for u, unit in it:
        with Trace(handle, edits=[unit_edit(kind, unit)]):
            effects[:, u] = base - mean_logodds(handle, items, batch_size)
    return AblationTruth(kind=kind, units=units, effects=effects, base=base)


def cheap_views(handle: Any, items: Sequence[Any], kind: UnitKind = "head", *, batch_size: int = 8) -> dict[str, np.ndarray]:
    """The three cheap localizers' unit scores [U] (higher: more responsible for the bias), from
    ambiguous/disambiguated pairs built out of ``items``:

    * ``correlation``: Pearson r between a unit's change of attribution and the change of the
      biased log-odds from ambiguous to disambiguated (the seed's context-sensitivity method);
    * ``attribution_patching``: gradient x activation, the first-order estimate of the drop of the
      ambiguous items' biased log-odds when the unit is zeroed;
    * ``activation_norm``: mean L2 norm of the unit's output at the last prompt token (ambiguous).
    """
    pairs = pair_items(items)
    if len(pairs) < 3:
        raise ValueError(f"cheap localizers need >= 3 ambiguous/disambiguated pairs, got {len(pairs)}")
    flat = [x for p in pairs for x in p]
    # one pass per batch: with activity "norm", "activity" is the norm and "estimate" the attribution
    parts = [_pass(handle, flat[s:s + batch_size], "norm", kind) for s in range(0, len(flat), batch_size)]
    lo = np.concatenate([p["logodds"] for p in parts])
    attr = np.concatenate([p["estimate"] for p in parts])
    n_units = attr.shape[1] * attr.shape[2]
    attr = attr.reshape(len(flat), n_units)
    norm = np.concatenate([p["activity"] for p in parts]).reshape(len(flat), n_units)
    amb, dis = np.arange(0, len(flat), 2), np.arange(1, len(flat), 2)
    r, _ = _pearson(attr[amb] - attr[dis], lo[amb] - lo[dis])
    return {"correlation": np.nan_to_num(r, nan=-np.inf), "attribution_patching": attr[amb].mean(0),
            "activation_norm": norm[amb].mean(0)}


def _top(values: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:k].tolist())


def score_against_truth(scores: np.ndarray, truth: AblationTruth, *, k: int = 10, n_boot: int = 1000,
                        seed: int = 0) -> dict[str, Estimate]:
    """precision@k and Spearman rho of a localizer's unit scores against the measured effects,
    with percentile-bootstrap CIs over the truth items (the localizer's ranking is fixed)."""
    scores = np.asarray(scores, dtype=float).reshape(-1)
    if scores.shape[0] != truth.effects.shape[1]:
        raise ValueError(f"{scores.shape[0]} scores for {truth.effects.shape[1]} units")
    k = min(k, scores.shape[0])
    top_pred = _top(scores, k)
    finite = np.where(np.isfinite(scores), scores, np.nanmin(scores[np.isfinite(scores)]) - 1 if np.isfinite(scores).any() else 0)
    rows = np.arange(truth.effects.shape[0])

    def precision(idx: np.ndarray) -> float:
        return len(top_pred & _top(truth.effects[idx.astype(int)].mean(0), k)) / k

    def spearman(idx: np.ndarray) -> float:
        t = truth.effects[idx.astype(int)].mean(0)
        if np.ptp(finite) == 0 or np.ptp(t) == 0:
            return float("nan")
        return float(sstats.spearmanr(finite, t).statistic)

    return {"precision_at_k": bootstrap(rows, precision, n_boot=n_boot, seed=seed),
            "spearman": bootstrap(rows, spearman, n_boot=n_boot, seed=seed), "k": k,
            "chance_precision": k / scores.shape[0]}


def random_scores(n_units: int, seed: int) -> np.ndarray:
    """A random ranking: the baseline every localizer must beat (its precision@k is about k/U)."""
    return np.random.default_rng(seed).random(n_units)
