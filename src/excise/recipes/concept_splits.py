"""The concept workflow's pools, fixed once in its ``screen`` stage so no evaluation item shapes the mask or the update.

* retain: ``retain_train`` trains (localization's contrast, the unlearning's KL term) and ``retain``
  evaluates; a spec without ``retain_train`` is split in halves (:func:`~excise.tasks.concepts.split_heldout`,
  seeded hash of the prompt) *before* screening, so the unscreened evaluation half is known too
  (``retain_accuracy_unscreened``: screening keeps only the retain items the base model answers, so the
  screened baseline is 100% by construction);
* forget: ``forget`` trains (localization, unlearning, the relearning attack) and ``forget_eval`` holds
  the direct probes; a spec without ``forget_eval`` has its screened ``forget`` items split in halves.

:func:`check_disjoint` proves that no training prompt is evaluated; :func:`relearn_sets` gives the
relearning attack's training items and the disjoint items that tell when the concept is back.
"""

from __future__ import annotations

from typing import Any

from excise.attack.probes import screen
from excise.errors import ExciseError
from excise.tasks.concepts import ConceptItem, ConceptSpec, split_heldout

HOLDOUT = 0.5  # share of forget (without forget_eval) and retain (without retain_train) held out for evaluation


def prepare(handle: Any, spec: ConceptSpec, *, seed: int, max_new_tokens: int,
            keep_all: bool = False) -> tuple[ConceptSpec, list[ConceptItem], dict, dict[str, list[str]]]:
    """Split and screen: (the run's spec, the unscreened retain evaluation items, the kept report, base generations).

    The run's spec has ``forget`` = training items, ``forget_eval`` = held-out direct probes, ``retain`` =
    screened evaluation items, ``retain_train`` = the retain training items; the generations are keyed like
    :meth:`ConceptSpec.probe_sets` plus ``retain`` and ``retain_unscreened``.
    """
    own_retain_train = bool(spec.retain_train)
    if own_retain_train:
        r_train, r_eval = list(spec.retain_train), list(spec.retain)
    else:
        r_train, r_eval = split_heldout(spec.retain, seed, HOLDOUT)
        if not r_eval:
            raise ExciseError(f"concept '{spec.name}': {len(spec.retain)} retain item(s) and no retain_train: too few "
                              "to split into training and evaluation halves (add retain items or retain_train)")
    spec = spec.model_copy(update={"retain": r_eval, "retain_train": r_train})
    filtered, report, gens = screen(handle, spec, max_new_tokens=max_new_tokens, keep_all=keep_all)
    rows = report["items"]
    if spec.forget_eval:
        f_train, f_held = list(filtered.forget), list(filtered.forget_eval)
    else:
        f_train, f_held = split_heldout(filtered.forget, seed, HOLDOUT)
        if not f_held:
            raise ExciseError(f"only {len(filtered.forget)} forget prompt of '{spec.name}' left after screening: too few "
                              "to hold out direct probes from training (add forget items or forget_eval)")
        by_prompt = {(r["prompt"], r["format"]): r["generation"] for r in rows if r["set"] == "forget"}
        gens["direct"] = [by_prompt[(it.prompt, it.format)] for it in f_held]
        held = {(it.prompt, it.format) for it in f_held}
        for r in rows:
            if r["set"] == "forget" and r["kept"]:
                r["role"] = "direct probe (held out)" if (r["prompt"], r["format"]) in held else "training"
    gens["retain_unscreened"] = [r["generation"] for r in rows if r["set"] == "retain"]
    final = filtered.model_copy(update={"forget": f_train, "forget_eval": f_held})
    report["splits"] = {
        "forget_train": len(f_train), "direct_heldout": len(f_held),
        "direct_from": "the spec's forget_eval" if spec.forget_eval else "held out from forget",
        "retain_train": len(r_train), "retain_train_from": "the spec's retain_train" if own_retain_train else "half of retain",
        "retain_eval_unscreened": len(r_eval), "retain_eval_screened": len(filtered.retain)}
    check_disjoint(final, r_eval)
    return final, r_eval, report, gens


def _key(it: ConceptItem) -> str:
    return it.prompt


def check_disjoint(spec: ConceptSpec, retain_unscreened: list[ConceptItem] = ()) -> None:
    """Raise if a training item (forget, retain_train) is also an evaluation item (any probe, retain)."""
    train = {_key(it) for it in [*spec.forget, *spec.retain_train]}
    evals = [*spec.forget_eval, *spec.paraphrases, *spec.adversarial, *spec.retain, *retain_unscreened]
    both = sorted({_key(it) for it in evals} & train)
    if both:
        raise ExciseError(f"concept '{spec.name}': {len(both)} prompt(s) are both trained on and evaluated "
                          f"(e.g. {both[0]!r}); training and evaluation items must be distinct")


def relearn_sets(spec: ConceptSpec, check: str) -> tuple[list[ConceptItem], list[ConceptItem]]:
    """(items the relearning attack trains on, held-out items whose leak rate says the concept is back)."""
    train = list(spec.forget)
    items = list(spec.forget_eval) if check == "direct" else list(spec.paraphrases)
    if not items:
        raise ExciseError(f"concept '{spec.name}': no {'held-out direct' if check == 'direct' else 'paraphrase'} "
                          f"probes left after screening for the relearning check (comparison.relearn_check: {check})")
    if {_key(it) for it in train} & {_key(it) for it in items}:
        raise ExciseError(f"concept '{spec.name}': the relearning attack would be checked on items it trains on")
    return train, items
