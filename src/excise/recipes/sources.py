"""Task sources for stage-list recipes: build examples for localizers and interventions, and an evaluator.

A source splits its task into disjoint pools before anything runs: *build* items feed
localizers and interventions (``LocateData``), *eval* items are the only ones a reported result
is computed on, and :meth:`TaskData.check_disjoint` proves the two never share an item. Each
source's evaluator returns one :class:`~excise.measure.frame.GroupedResult`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.locate.base import Example, LocateData
from excise.locate.heads import pair_items
from excise.measure.bbq import bias_scores
from excise.measure.frame import GroupedResult
from excise.measure.unlearning import evaluate as concept_evaluate
from excise.measure.unlearning import frame
from excise.recipes.bbq_eval import predict
from excise.tasks.bbq import split_items
from excise.registry import Configured, Registry
from excise.tasks.bbq import load_bbq, sample_bbq
from excise.tasks.concepts import format_prompt, load_concept, split_heldout
from excise.tasks.bbq_prompts import loglik_prompt


@dataclass
class TaskData:
    """Build data, the evaluator and the ids of each pool (for the disjointness check)."""

    build: LocateData
    evaluate: Callable[[Any], GroupedResult]
    pools: dict[str, list[str]] = field(default_factory=dict)

    def check_disjoint(self) -> None:
        build, held = set(self.pools.get("build", [])), set(self.pools.get("eval", []))
        both = build & held
        if both:
            raise ExciseError(f"{len(both)} items are both build and eval items (e.g. {sorted(both)[0]})")


class TaskSource(Configured):
    """A registered task: ``build(handle, seed)`` splits it into build and eval pools (see module doc)."""

    name: str
    Config: type[BaseModel]

    def build(self, handle: Any, seed: int) -> TaskData:  # pragma: no cover - protocol
        raise NotImplementedError


TASKS: Registry[TaskSource] = Registry("task")


# --- BBQ -------------------------------------------------------------------------------------------

class BBQSourceConfig(BaseModel):
    """BBQ as a stage-list task: the bias is the stereotyped answer to ambiguous questions."""

    model_config = {"extra": "forbid"}
    categories: list[str] = Field(default_factory=lambda: ["Age", "SES"], description="BBQ categories")
    eval_per_category: int = Field(24, ge=1, description="held-out eval items per category (condition x polarity strata)")
    build_per_category: int = Field(16, ge=2, description="ambiguous/disambiguated build pairs per category")
    eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of templates held out for evaluation")
    split_by: Literal["template", "names"] = Field("template", description="unit kept on one side of the split")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples of the bias-score CIs")
    batch_size: int = Field(8, ge=1, description="items per scoring pass")
    data_dir: str | None = Field(None, description="directory of <Category>.jsonl (default: packaged copy)")


@TASKS.register
class BBQSource(TaskSource):
    """Forget = ambiguous build items answered with the stereotyped target; retain = disambiguated, correct."""

    name = "bbq"
    Config = BBQSourceConfig

    def build(self, handle: Any, seed: int) -> TaskData:
        c = self.config
        items = load_bbq(c.categories, data_dir=c.data_dir)
        train, held = split_items(items, c.eval_fraction, seed, c.split_by)
        eval_items = sample_bbq(held, c.eval_per_category, seed=seed)
        rng = random.Random(seed)
        pairs: list[Any] = []
        for cat in sorted({x.category for x in train}):
            cp = pair_items([x for x in train if x.category == cat and x.target_loc is not None])
            rng.shuffle(cp)
            pairs += cp[: c.build_per_category]
        build_items = [x for p in pairs for x in p]
        forget = [Example(loglik_prompt(a), " " + a.answers[a.target_loc].strip()) for a, _ in pairs]
        retain = [Example(loglik_prompt(d), " " + d.answers[d.label].strip()) for _, d in pairs]

        def evaluate(h: Any) -> GroupedResult:
            rows = predict(h, eval_items, "loglik", batch_size=c.batch_size)
            return bias_scores(rows, n_boot=c.n_boot, seed=seed).frame()

        ids = lambda xs: [f"{x.category}:{x.example_id}" for x in xs]  # noqa: E731
        return TaskData(LocateData(forget, retain, build_items), evaluate,
                        {"build": ids(build_items), "eval": ids(eval_items)})


# --- concept unlearning ----------------------------------------------------------------------------

class ConceptSourceConfig(BaseModel):
    """A concept spec as a stage-list task: forget the direct probes, report on held-out probe families."""

    model_config = {"extra": "forbid"}
    concept: str = Field("inception", description="concept spec: a YAML/JSON path or a packaged name")
    retain_eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of retain items kept for evaluation only "
                                                                     "(when the spec has no retain_train items)")
    max_new_tokens: int = Field(24, ge=1, description="greedy tokens generated per probe")
    batch_size: int = Field(16, ge=1, description="prompts per generation pass")


@TASKS.register
class ConceptSource(TaskSource):
    """Forget = direct probes with the concept's answer; retain = the spec's retain_train items (else half of
    the retain items, :func:`~excise.tasks.concepts.split_heldout`; the rest evaluate). The spec's
    ``forget_eval`` items, if any, are reported as held-out direct probes."""

    name = "concept"
    Config = ConceptSourceConfig

    def build(self, handle: Any, seed: int) -> TaskData:
        c = self.config
        spec = load_concept(c.concept)
        if spec.retain_train:  # the spec keeps its own retain training items apart: evaluate on every retain item
            held, kept = list(spec.retain), list(spec.retain_train)
        else:
            kept, held = split_heldout(spec.retain, seed, c.retain_eval_fraction)
        if not held or not kept:
            raise ExciseError(f"concept '{c.concept}': too few retain items to split into build and eval")
        forget = [Example(format_prompt(handle, it), it.target(), "completion") for it in spec.forget]
        retain = [Example(format_prompt(handle, it), it.target(), "completion") for it in kept]
        eval_spec = spec.model_copy(update={"retain": held})

        def evaluate(h: Any) -> GroupedResult:
            res = concept_evaluate(h, eval_spec, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, seed=seed)
            return frame(res, build_sets=() if spec.forget_eval else ("direct",))

        probes = [it.prompt for fam, its in eval_spec.probe_sets().items() if fam != "direct" or spec.forget_eval
                  for it in its]
        return TaskData(LocateData(forget, retain, list(spec.forget)), evaluate,
                        {"build": [it.prompt for it in list(spec.forget) + kept],
                         "eval": probes + [it.prompt for it in held]})
