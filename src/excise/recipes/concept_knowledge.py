"""The concept workflow on the knowledge organism (``concept: knowledge``): its model, its spec, TOFU metrics.

The organism (:mod:`excise.organisms.knowledge`, built once and cached) replaces the workflow's model
and its knowledge base becomes the spec (:func:`~excise.organisms.knowledge.concept_spec`), so every
unlearning variant runs unchanged. Beside the workflow's own leak and retain measures, each model
state gets TOFU's metrics against the oracle (forget quality, model utility, answer probability,
truth ratio, ROUGE-L, min-k% membership inference and privleak), with retain scored only on the
films the unlearning's KL term never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from excise.io import atomic_write_json, atomic_write_text
from excise.measure.frame import GroupedResult
from excise.organisms.knowledge import (KnowledgeOrganism, build_knowledge, concept_spec, evaluate_knowledge, kl_films,
                                       save_scores, saved_result)
from excise.processes import is_main_process
from excise.tasks.concepts import ConceptSpec

KNOWLEDGE = "knowledge"
HEADLINE = ("forget_quality", "model_utility", "forget_answer_prob", "forget_truth_ratio", "mia_min_k_auc", "privleak")


def knowledge_source(cfg: Any, console: Any = None) -> tuple[KnowledgeOrganism, ConceptSpec, str]:
    """(organism, its concept spec, the organism's model directory); builds the organism on first use."""
    org = build_knowledge(cfg.knowledge, console=console)
    return org, concept_spec(org), str(org.organism_dir)


def tofu(handle: Any, org: KnowledgeOrganism, model: Any = None) -> GroupedResult:
    """TOFU metrics of one model state (``model`` overrides ``handle.model``) against the organism's oracle."""
    res, _ = evaluate_knowledge(handle, org, model=model, retain_exclude=kl_films(org))
    return res


def oracle_reference(org: KnowledgeOrganism) -> GroupedResult:
    """The oracle's own TOFU row (forget quality 1 by definition): the line every method is read against.
    Read from the scores saved with the oracle when they cover the retain films scored, else measured."""
    saved = saved_result(org, "oracle", retain_exclude=kl_films(org))
    return saved if saved is not None else tofu(org.load("oracle"), org)


def organism_reference(handle: Any, org: KnowledgeOrganism) -> GroupedResult:
    """The organism's own TOFU row, the same in every run on it: read from its saved per-item scores, else
    measured once on every retain film and saved beside the cached organism (an organism built before
    its scores were saved with it)."""
    saved = saved_result(org, "organism", retain_exclude=kl_films(org))
    if saved is not None:
        return saved
    _, scores = evaluate_knowledge(handle, org, oracle={})
    if is_main_process():
        save_scores(org, "organism", scores)
    saved = saved_result(org, "organism", retain_exclude=kl_films(org))
    return saved if saved is not None else tofu(handle, org)


def write_tofu(d: Path, results: dict[str, GroupedResult], title: str) -> dict:
    """``tofu.md`` (one column per model state), ``tofu.json``; returns the headline metrics per state."""
    for name, r in results.items():
        r.save(d, f"tofu_{name}")
    names = list(results)
    lines = [f"# {title}", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in HEADLINE:
        cells = []
        for n in names:
            e = results[n].overall.get(m)
            cells.append("-" if e is None or not e.defined else
                         (f"{e.value:.3g} (n={e.n})" if e.lo != e.lo else f"{e.value:.3g} [{e.lo:.3g}, {e.hi:.3g}] (n={e.n})"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for fam in ("retain_shared", "retain_other", "world"):
        cells = [f"{results[n].by_group[fam]['accuracy'].value:.3g}" if fam in results[n].by_group
                 and "accuracy" in results[n].by_group[fam] else "-" for n in names]
        lines.append(f"| {fam} accuracy | " + " | ".join(cells) + " |")
    lines += ["", "Forget quality: KS-test p-value of the forget set's truth ratios against the oracle's (p >= 0.05: "
              "not distinguishable from a model that never learned them); model utility: harmonic mean over the retain "
              "families (retain films outside the KL term, world facts). Definitions follow open-unlearning d3d7cf9."]
    atomic_write_text(d / "tofu.md", "\n".join(lines) + "\n")
    head = {n: {m: (results[n].overall[m].value if m in results[n].overall else None) for m in HEADLINE} for n in names}
    atomic_write_json(d / "tofu.json", head)
    return head


__all__ = ["KNOWLEDGE", "knowledge_source", "oracle_reference", "organism_reference", "tofu", "write_tofu"]
