"""Probes beyond the training prompts: screen a spec on the base model, then probe by family.

Why screen: a small model does not know every fact a spec lists, and a probe it never answered
cannot show forgetting. :func:`screen` keeps the forget, paraphrase and adversarial items the
base model leaks on and the retain items it gets right (greedy generation), and reports how many
of each were kept; the greedy outputs are returned so the "before" measures reuse them.
"""

from __future__ import annotations

from typing import Any

from excise.errors import ExciseError
from excise.measure.stats import wilson
from excise.measure.unlearning import generate


def screen(handle: Any, spec: Any, *, max_new_tokens: int = 24, batch_size: int = 16, keep_forget_all: bool = False,
           keep_all: bool = False) -> tuple[Any, dict, dict[str, list[str]]]:
    """Return (filtered spec, kept report, base generations keyed like ``spec.probe_sets()`` + ``retain``).

    ``keep_all`` keeps every item whatever the base model answers (the generations are still recorded)."""
    sets = {"forget": spec.forget, "forget_eval": spec.forget_eval, "paraphrases": spec.paraphrases,
            "adversarial": spec.adversarial, "retain": spec.retain}
    if not spec.forget_eval:
        del sets["forget_eval"]
    gens: dict[str, list[str]] = {}
    keep: dict[str, list[bool]] = {}
    for key, items in sets.items():
        g = generate(handle, items, max_new_tokens=max_new_tokens, batch_size=batch_size) if items else []
        gens[key] = g
        if keep_all:
            keep[key] = [True] * len(items)
        elif key == "retain":
            keep[key] = [spec.correct(it, x) for it, x in zip(items, g)]
        else:
            keep[key] = [True if (keep_forget_all and key == "forget") else spec.leaks(it, x) for it, x in zip(items, g)]
    filtered = spec.filtered(keep)
    if not filtered.forget:
        raise ExciseError(f"the base model leaks on none of the {len(spec.forget)} forget prompts of '{spec.name}': "
                          "nothing to unlearn (check the prompt format: chat vs completion)")
    if spec.forget_eval and not filtered.forget_eval:
        raise ExciseError(f"the base model leaks on none of the {len(spec.forget_eval)} forget_eval prompts of "
                          f"'{spec.name}': no held-out direct probe left")
    if not filtered.retain:
        raise ExciseError(f"the base model answers none of the {len(spec.retain)} retain prompts of '{spec.name}' correctly")
    report: dict[str, Any] = {k: {"candidates": len(v), "kept": int(sum(keep[k]))} for k, v in sets.items()}
    by_fam: dict[str, dict[str, int]] = {}
    for it, k in zip(spec.adversarial, keep["adversarial"]):
        d = by_fam.setdefault(it.family, {"candidates": 0, "kept": 0})
        d["candidates"] += 1
        d["kept"] += int(k)
    report["adversarial_by_family"] = by_fam
    by_fmt: dict[str, dict[str, int]] = {}
    for key in ("forget", "paraphrases"):
        for it, k in zip(sets[key], keep[key]):
            d = by_fmt.setdefault(it.format, {"candidates": 0, "kept": 0})
            d["candidates"] += 1
            d["kept"] += int(k)
    report["direct_and_paraphrase_by_format"] = by_fmt
    # reuse the greedy outputs of kept items as the "before" generations
    kept_gens = {k: [g for g, f in zip(gens[k], keep[k]) if f] for k in sets}
    before: dict[str, list[str]] = {"direct": kept_gens["forget_eval" if spec.forget_eval else "forget"],
                                    "paraphrase": kept_gens["paraphrases"],
                                    "retain": kept_gens["retain"]}
    for it, g in zip(filtered.adversarial, kept_gens["adversarial"]):
        before.setdefault(f"adv_{it.family}", []).append(g)
    rows = []
    for key, items in sets.items():
        for it, g, k in zip(items, gens[key], keep[key]):
            rows.append({"set": key, "family": it.family, "format": it.format, "prompt": it.prompt, "generation": g,
                         "kept": int(k)})
    report["items"] = rows
    return filtered, report, before


def leak_by_family(handle: Any, spec: Any, *, model: Any = None, max_new_tokens: int = 24) -> dict[str, Any]:
    """Leak rate (Wilson CI) per probe family of a model state, without the other measures."""
    out = {}
    for fam, items in spec.probe_sets().items():
        gens = generate(handle, items, max_new_tokens=max_new_tokens, model=model)
        flags = [spec.leaks(it, g) for it, g in zip(items, gens)]
        out[fam] = wilson(sum(flags), len(flags)).as_dict()
    return out
