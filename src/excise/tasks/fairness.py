"""Fairness classification tasks: a text (or text pair), a label and protected attributes.

One import for the whole data layer of the fair-encoder workflow:

* types and splitting (:mod:`excise.tasks.fairness_data`): :class:`FairExample`,
  :class:`FairTable`, :class:`FairDataset`, :func:`split_dataset` (seeded, stratified by
  label x first attribute, independent of input order, a text never in two splits);
* users' data (:mod:`excise.tasks.fairness_table`): :func:`load_table` (CSV / TSV / JSONL) and
  :func:`load_hf` (Hugging Face datasets), configurable columns, file:line:field errors;
* the packaged data sets (:mod:`excise.tasks.fairness_bench`): :func:`load_bug` (profession
  classification with the profession word masked, gender as the protected attribute; a binary
  framing for Fairlearn) and :func:`load_grep_biasir` (gendered document versions per query);
* counterfactuals (:mod:`excise.tasks.gender_swap`): :func:`gender_swap`, :func:`counterfactual`.

Example::

    ds = load_bug(seed=0)                        # 11,894 sentences, 12 professions
    ds.train[0].text, ds.label_names[ds.train[0].label], ds.train[0].groups["gender"]
    table = load_table("hiring.csv", text="resume", text_pair="job", label="hired",
                       groups={"gender": "gender", "age": "age_band"})
    ds = table.split((0.7, 0.15, 0.15), seed=1)
"""

from __future__ import annotations

from excise.tasks.fairness_bench import (
    BINARY_POSITIVE,
    DEFAULT_PROFESSIONS,
    BugConfig,
    GrepQuery,
    grep_summary,
    load_bug,
    load_grep_biasir,
    packaged_benchmark_dir,
    profession_pattern,
)
from excise.tasks.fairness_data import (
    SPLITS,
    FairDataset,
    FairExample,
    FairTable,
    SplitConfig,
    count_examples,
    split_dataset,
    text_key,
)
from excise.tasks.fairness_table import TableConfig, load_hf, load_table
from excise.tasks.gender_swap import counterfactual, gender_swap, swap_table

__all__ = [
    "BINARY_POSITIVE", "DEFAULT_PROFESSIONS", "SPLITS", "BugConfig", "FairDataset", "FairExample", "FairTable",
    "GrepQuery", "SplitConfig", "TableConfig", "count_examples", "counterfactual", "gender_swap", "grep_summary",
    "load_bug", "load_grep_biasir", "load_hf", "load_table", "packaged_benchmark_dir", "profession_pattern",
    "split_dataset", "swap_table", "text_key",
]
