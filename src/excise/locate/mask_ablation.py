"""Do a mask's units matter? Ablate them on held-out items, against random masks of the same size.

Ground truth is measured, not assumed (design note 10): the selected units are really switched
off -- MLP neurons zeroed at ``mlp.L.hidden``, heads at ``attn.L.z`` -- and the drop of the
answer's mean token log-probability is measured per item, on held-out forget items that
localization never saw (does the mask hold the knowledge?) and on retain items (is it specific?).
The same is done for ``n_random`` random masks with as many units in every layer
(:func:`excise.locate.saliency.random_mask_like`), the baseline of every localizer. Reported per
mask: the mean drop on each set with a bootstrap CI, and the paired per-item difference
selected minus random (the random drop averaged over the draws), whose CI says whether the
selected units matter more than random units of equal count.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from excise.locate.saliency import random_mask_like
from excise.measure.frame import estimate_dict
from excise.measure.stats import bootstrap, bootstrap_diff
from excise.measure.unlearning import answer_logprobs
from excise.select import Mask
from excise.sites import Edit
from excise.trace import Trace


def ablation_edits(mask: Mask) -> list[Edit]:
    """Edits that switch the mask's units off: neurons (``mlp.L.hidden`` scaled by a 0/1 vector) or heads."""
    edits = []
    for layer, row in enumerate(mask.values):
        if not bool(row.any()):
            continue
        if mask.kind == "head":
            edits.append(Edit(f"attn.{layer}.z", "zero", heads=[int(h) for h in torch.nonzero(row).flatten()]))
        else:
            edits.append(Edit(f"mlp.{layer}.hidden", "scale", value=(~row).float()))
    return edits


def token_logprobs(handle: Any, items: Sequence[Any], mask: Mask | None = None, *, batch_size: int = 16) -> np.ndarray:
    """Mean token log-probability of each item's answer, with the mask's units ablated (None: intact)."""
    if mask is None:
        rows = answer_logprobs(handle, items, batch_size=batch_size)
    else:
        with Trace(handle, edits=ablation_edits(mask)):
            rows = answer_logprobs(handle, items, batch_size=batch_size)
    return np.array([r["token_logprob"] for r in rows], dtype=float)


def score_masks(handle: Any, masks: dict[str, Mask], sets: dict[str, Sequence[Any]], *, n_random: int = 3,
                seed: int = 0, batch_size: int = 16) -> dict:
    """Per mask and item set: the mean drop when ablated, the random masks' drop, and selected minus random.

    ``sets`` maps a name (e.g. ``forget_heldout``, ``retain``) to items none of the masks was
    localized on. Random masks are drawn with seeds ``seed .. seed + n_random - 1`` per mask."""
    out: dict[str, Any] = {"n_random": n_random, "metric": "drop of the answer's mean token log-prob when ablated",
                           "masks": {}}
    intact = {name: token_logprobs(handle, items, batch_size=batch_size) for name, items in sets.items()}
    for mname, mask in masks.items():
        randoms = [random_mask_like(mask, seed=seed + i) for i in range(n_random)]
        per_set = {}
        for sname, items in sets.items():
            drop = intact[sname] - token_logprobs(handle, items, mask, batch_size=batch_size)
            rdrop = np.mean([intact[sname] - token_logprobs(handle, items, r, batch_size=batch_size) for r in randoms], 0)
            per_set[sname] = {"selected": estimate_dict(bootstrap(drop, np.mean, seed=seed)),
                              "random": estimate_dict(bootstrap(rdrop, np.mean, seed=seed)),
                              "selected_minus_random": estimate_dict(bootstrap_diff(drop, rdrop, paired=True, seed=seed))}
        out["masks"][mname] = {"n_units": mask.n_selected, "sets": per_set}
    return out


def markdown(result: dict) -> str:
    """One row per (mask, item set): drop selected, drop random, difference with CIs."""
    def cell(e: dict) -> str:
        if e.get("value") is None or e["value"] != e["value"]:
            return f"undefined (n={e.get('n', 0)})"
        return f"{e['value']:.3g} [{e['lo']:.3g}, {e['hi']:.3g}] (n={e['n']})"

    lines = ["| mask | units | items | drop, selected units | drop, random units (mean of "
             f"{result['n_random']}) | selected - random |", "|---|---|---|---|---|---|"]
    for mname, m in result["masks"].items():
        for sname, s in m["sets"].items():
            lines.append(f"| {mname} | {m['n_units']} | {sname} | {cell(s['selected'])} | {cell(s['random'])} | "
                         f"{cell(s['selected_minus_random'])} |")
    return "\n".join(lines) + f"\n\nDrop: {result['metric']} (nats per token; positive: the units carry it). " \
                              "Items: none was localized on.\n"


__all__ = ["ablation_edits", "markdown", "score_masks", "token_logprobs"]
