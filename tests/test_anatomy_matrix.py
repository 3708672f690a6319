"""The family matrix: every family excise supports (by spec, mixture of experts, or inferred) x every check.

Checks per family, on a tiny random model saved to a directory: **load** it with
``excise.models.load`` (anatomy by spec or inferred, as expected), **trace** every site kind with
the documented shapes (router and expert sites on mixture-of-experts layers), a **head edit**
changes the output, the head-scale **hook = bake**, and one **task**: packed log-likelihood equals
the naive one (decoders) or mean-pooled embeddings of a padded batch equal each text alone
(encoders). The table in docs/core.md is generated from :func:`excise.testing.matrix_cases`;
``test_doc_matrix_is_current`` fails if it drifts. Regenerate with
``.venv/bin/python tests/test_anatomy_matrix.py`` (add ``--census`` for the slow census).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from excise import lm
from excise.intervene.fair_embed import embed
from excise.intervene.heads import HeadScales, bake_head_scales, scale_heads
from excise.lm import LoglikRequest
from excise.models.anatomy import Anatomy
from excise.models.anatomy.census import (
    between_markers,
    census_markdown,
    census_rows,
    matrix_markdown,
    matrix_row,
    replace_between_markers,
)
from excise.models.anatomy.spec import _REGISTRY
from excise.models.load import from_model, load
from excise.sites import parse_site
from excise.testing import _is_encoder, matrix_cases, save_tiny, tiny_model
from excise.trace import Edit, Trace

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = Path(__file__).resolve().parent.parent / "docs" / "core.md"
CASES = matrix_cases()


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _shape(kind: str, an, B: int, T: int) -> tuple:
    return {"resid": (B, T, an.d_model), "attn.z": (B, T, an.n_heads, an.head_dim), "attn.pattern": (B, an.n_heads, T, T),
            "mlp.hidden": (B, T, an.d_mlp), "mlp.out": (B, T, an.d_model), "mlp.router": (B, T, an.n_experts),
            "mlp.expert.hidden": (B, T, an.d_expert), "mlp.expert.out": (B, T, an.d_model)}[kind]


@pytest.mark.parametrize("case,mt,over", CASES, ids=[c[0] for c in CASES])
def test_family_matrix(case, mt, over, tmp_path):
    encoder = _is_encoder(mt)
    h = load(str(save_tiny(mt, tmp_path / "m", **over)), kind="encoder" if encoder else "causal-lm",
             attn_implementation="eager")
    an = h.anatomy
    assert an.spec.inferred == (mt not in _REGISTRY) and an.spec.is_decoder == (not encoder)

    batch = h.encode(["hello there", "hi"])
    B, T = batch["input_ids"].shape
    sites = ["all"] + ([f"mlp.{an.moe_layers[0]}.expert.*.hidden", f"mlp.{an.moe_layers[0]}.expert.*.out"]
                       if an.moe_layers else [])
    with torch.no_grad(), Trace(h, sites) as tr:
        clean = _out(h.model(**batch))
    kinds = {parse_site(name).kind for name in tr.cache}
    assert kinds >= {"resid", "attn.z", "attn.pattern", "mlp.out"} and ("mlp.hidden" in kinds or an.moe_layers)
    for name, x in tr.cache.items():
        assert tuple(x.shape) == _shape(parse_site(name).kind, an, B, T), (case, name)
        assert torch.isfinite(x).all(), (case, name)

    with torch.no_grad(), Trace(h, edits=[Edit(f"attn.{an.n_layers - 1}.z", "zero", heads=[1])]):
        assert not torch.allclose(_out(h.model(**batch)), clean, atol=1e-6), case

    s = HeadScales.from_heads(an, [(0, 1), (an.n_layers - 1, 3)], 0.3)
    with torch.no_grad(), scale_heads(h, s):
        hooked = _out(h.model(**batch))
    h2 = from_model(copy.deepcopy(h.model), h.tokenizer, kind=h.kind)
    bake_head_scales(h2, s)
    with torch.no_grad():
        torch.testing.assert_close(hooked, _out(h2.model(**batch)), atol=1e-5, rtol=1e-5)

    if encoder:
        texts = ["the doctor said", "hi"]
        both = embed(h, texts, "mean", normalize=False)
        alone = np.concatenate([embed(h, [t], "mean", normalize=False) for t in texts])
        assert both.shape == (2, an.d_model)
        np.testing.assert_allclose(both, alone, atol=1e-4, rtol=0)
    else:
        reqs = [LoglikRequest("Q: what is seven times six?\nA:", (" 42", " six")), LoglikRequest("hi", (" there",))]
        naive = lm.loglikelihood_naive(h, reqs)
        for x, y in zip(lm.loglikelihood(h, reqs, batch_size=2), naive):
            assert np.isfinite(x).all()
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)


def matrix_doc() -> str:
    rows = [matrix_row(case, Anatomy.of(tiny_model(mt, **over))) for case, mt, over in CASES]
    return matrix_markdown(rows)


def test_doc_matrix_is_current():
    """docs/core.md's matrix is what the code generates (regenerate: python tests/test_anatomy_matrix.py)."""
    assert len(CASES) >= 30
    assert between_markers(DOC.read_text(encoding="utf-8"), "matrix") == matrix_doc()


@pytest.mark.slow
def test_doc_census_is_current():
    """docs/core.md's census of transformers' text families is what the code finds (about 2 minutes)."""
    assert between_markers(DOC.read_text(encoding="utf-8"), "census") == census_markdown(census_rows())


if __name__ == "__main__":  # regenerate the doc sections
    torch.set_num_threads(1)
    text = replace_between_markers(DOC.read_text(encoding="utf-8"), "matrix", matrix_doc())
    if "--census" in sys.argv:
        text = replace_between_markers(text, "census", census_markdown(census_rows(progress=True)))
    DOC.write_text(text, encoding="utf-8")
