"""BBQ scoring through excise.lm on tiny random models (seconds) and one end-to-end `bbq eval` on SmolLM2 (slow)."""

import json

import numpy as np
import pytest
import torch

from excise import lm, lm_packed
from excise.errors import ExciseError
from excise.measure.bbq import bias_scores
from excise.recipes import bbq_eval as be
from excise.tasks.bbq import load_bbq, sample_bbq
from excise.tasks.bbq_prompts import loglik_options, loglik_requests
from excise.testing import DECODERS, tiny_handle


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared CPU, spinning OpenMP threads cost 10x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def items():
    return sample_bbq(load_bbq(["Age", "Race_x_SES"], limit_per_category=40), 4, seed=0)


def _tiny(fam):
    long = {"n_positions": 1024} if fam == "gpt2" else {"max_position_embeddings": 1024}
    return tiny_handle(fam, **long)


@pytest.fixture(scope="module")
def family_items():
    """Consecutive full-BBQ items: 3 context families of 4 (ambig/disambig x neg/nonneg) whose
    prompts share their start, so the packed scorer puts several items in one row."""
    return load_bbq(["Age"], limit_per_category=12)


def _has_uneven_options(h, items):
    _, o = lm.encode_requests(h.tokenizer, loglik_requests(items))
    return any(len({len(x) for x in os_}) > 1 for os_ in o)


def score(h, items, batch_size=8, **kw):
    """[N, 3] loglik scores of BBQ items."""
    res = lm.loglikelihood(h, loglik_requests(items), batch_size=batch_size, **kw)
    return np.stack(res) if res else np.zeros((0, 3))


def naive(h, items):
    return np.stack(lm.loglikelihood_naive(h, loglik_requests(items)))


@pytest.mark.parametrize("fam", DECODERS)
def test_packed_loglik_equals_naive(items, fam):
    h = _tiny(fam)
    assert lm_packed.packed_ok(h.model), fam  # every supported decoder family takes the packed path
    assert _has_uneven_options(h, items)
    ref = naive(h, items)
    for bs in (1, 3):  # one row per batch; an uneven last batch with mixed lengths
        np.testing.assert_allclose(score(h, items, batch_size=bs), ref, atol=1e-4, rtol=0)
    assert not np.allclose(ref[:, 0], ref[:, 1])  # options really differ


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_packed_rows_shared_by_items_equal_naive(family_items, fam):
    h = _tiny(fam)
    p, _ = lm.encode_requests(h.tokenizer, loglik_requests(family_items))
    rows = lm_packed.share_rows(p, 8)
    assert max(map(len, rows)) >= 4 and sorted(i for r in rows for i in r) == list(range(len(family_items)))
    assert all(len(r) <= 3 for r in lm_packed.share_rows(p, 3))  # a row never holds more than a batch
    ref = naive(h, family_items)
    for bs in (3, 8):
        np.testing.assert_allclose(score(h, family_items, batch_size=bs), ref, atol=1e-4, rtol=0)


def test_packed_sdpa_and_padding_side(items):
    h = _tiny("llama")
    ref = score(h, items, batch_size=3)
    sd = tiny_handle("llama", attn_implementation="sdpa", max_position_embeddings=1024)
    assert lm_packed.packed_ok(sd.model)
    np.testing.assert_allclose(score(sd, items, batch_size=3), ref, atol=1e-5)
    for side in ("left", "right"):  # the tokenizer's own padding side does not matter
        h.tokenizer.padding_side = side
        np.testing.assert_allclose(score(h, items, batch_size=3), ref, atol=1e-6)


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_kv_cache_fallback_equals_naive(items, fam, monkeypatch):
    h = _tiny(fam)
    monkeypatch.setattr(lm_packed, "packed_ok", lambda model: False)
    monkeypatch.setattr(lm_packed, "loglik_packed", None)  # must not be reached
    ref = naive(h, items)
    for bs in (1, 3):
        np.testing.assert_allclose(score(h, items, batch_size=bs), ref, atol=1e-4, rtol=0)


def test_packed_path_choice(items, monkeypatch):
    h = _tiny("llama")
    h.model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask: KV-cache path
    assert not lm_packed.packed_ok(h.model)
    h.model.config._attn_implementation = "eager"
    assert lm_packed.packed_ok(h.model)

    class Wrapped(torch.nn.Module):  # modeling code that does not build masks with masking_utils
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, logits_to_keep=0, **kw):
            return self.m(logits_to_keep=logits_to_keep, **kw)

    assert not lm_packed.packed_ok(Wrapped(h.model))
    # a sliding window shorter than an item: a custom 4D mask would drop the window -> KV-cache path
    w = _tiny("mistral")
    w.model.config.sliding_window = 48
    w.model.config._attn_implementation = "eager"
    calls = []
    real = lm_packed.loglik_kv
    monkeypatch.setattr(lm_packed, "loglik_kv", lambda *a: calls.append(1) or real(*a))
    np.testing.assert_allclose(score(w, items, batch_size=3), naive(w, items), atol=1e-4)
    assert calls


def test_loglik_normalisation_and_batch_invariance(items):
    h = _tiny("llama")
    s = score(h, items, batch_size=3)
    np.testing.assert_allclose(s, score(h, items, batch_size=12), atol=1e-4)
    np.testing.assert_allclose(s, score(h, items, batch_size=1), atol=1e-4)
    assert score(h, [], batch_size=3).shape == (0, 3)
    tok = score(h, items, batch_size=3, normalize="tokens")
    lens = np.array([[len(o.encode()) for o in loglik_options(x)] for x in items])  # byte tokenizer
    np.testing.assert_allclose(tok, s / lens, atol=1e-5)
    ch = score(h, items, batch_size=3, normalize="chars")
    np.testing.assert_allclose(ch, s / np.array([[len(o) for o in loglik_options(x)] for x in items]), atol=1e-5)
    with pytest.raises(ExciseError, match="normalize"):
        score(h, items, normalize="bytes")
    rows = be.predict(h, items, "loglik", batch_size=4, normalize="tokens")
    np.testing.assert_allclose([r["scores"] for r in rows], tok, atol=1e-6)


def test_predict_modes(items):
    h = _tiny("llama")
    rows = be.predict(h, items, "loglik", batch_size=4)
    assert [r["pred"] for r in rows] == list(np.argmax(score(h, items), 1))
    assert all(r["correct"] == int(r["pred"] == r["label"]) for r in rows)
    letter = be.predict(h, items, "letter", batch_size=4)
    assert all(r["pred"] in (0, 1, 2) and len(r["scores"]) == 3 for r in letter)
    rep = bias_scores(letter, n_boot=50)
    assert sum(rep.pred_counts[k] for k in "ABC") == len(items)
    gen = be.predict(h, items[:4], "generate", batch_size=4, max_new_tokens=3)
    assert all(isinstance(r["response"], str) for r in gen)
    # a random byte model answers gibberish: unmapped answers are counted, not guessed
    assert bias_scores(gen, n_boot=20).n_unmatched == sum(r["pred"] is None for r in gen)
    with pytest.raises(ExciseError, match="scoring mode"):
        be.predict(h, items, "vibes")


def test_ties_pick_first_option(items, monkeypatch):
    monkeypatch.setattr(lm, "loglikelihood", lambda *a, **k: [np.zeros(3) for _ in items])
    assert {r["pred"] for r in be.predict(None, items)} == {0}


def test_eval_workflow_resumes(tmp_path, items):
    h = _tiny("llama")
    cfg = be.BBQEvalConfig(model="tiny", categories=["Age", "Religion"], per_category=8, n_boot=50)
    res = be.run_eval(cfg, tmp_path / "run", handle=h)
    d = tmp_path / "run"
    for p in ("data/items.jsonl", "predict/predictions.jsonl", "predict/metrics.json", "scores/bias_scores.json",
              "scores/bias_scores.csv", "scores/bias_scores.txt", "scores/bias_scores.png"):
        assert (d / p).exists(), p
    preds = [json.loads(l) for l in (d / "predict/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and all("pred" in r and "target_loc" in r for r in preds)
    again = be.run_eval(cfg, tmp_path / "run", handle=h)
    assert again["skipped"] and again["text"] == res["text"]
    # the predictions file scores the same through the `score` path
    sc = be.run_score(d / "predict/predictions.jsonl", tmp_path / "rescored", n_boot=50)
    assert sc["summary"]["overall"]["s_amb"] == res["scores"]["overall"]["s_amb"]


@pytest.mark.slow
def test_bbq_eval_cli_on_smollm2(tmp_path, capsys, smollm2):
    from excise.cli import main

    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        main(["bbq", "eval", "--model", "smollm2-135m-instruct", "--categories", "Age,Religion",
              "--per-category", "4", "--out", str(out), "--seed", "0", "--n-boot", "200"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "overall" in text and "Religion" in text
    m = json.loads((out / "predict/metrics.json").read_text())
    assert m["n_items"] == 8 and m["items_per_second"] > 0
    scores = json.loads((out / "scores/bias_scores.json").read_text())
    assert scores["overall"]["acc_disambig"]["n"] == 4
    # shared-prefix scores on the real model equal the naive per-option reference
    from excise.tasks.bbq import load_jsonl

    its = load_jsonl(out / "data/items.jsonl")[:2]
    shared = score(smollm2, its, batch_size=2)
    np.testing.assert_allclose(shared[:1], naive(smollm2, its[:1]), atol=1e-4)
    preds = [json.loads(l) for l in (out / "predict/predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([p["scores"] for p in preds[:2]], shared, atol=1e-4)
