"""excise.lm: log-likelihood (packed and KV-cache paths), next-token sets, generation and training
batches, on tiny random models of every decoder family (seconds)."""

import numpy as np
import pytest
import torch

from excise import lm, lm_packed
from excise.errors import ExciseError
from excise.lm import LoglikRequest
from excise.testing import DECODERS, EXTRA_DECODERS, tiny_handle

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXTS = [
    "The committee met on Tuesday to discuss the budget.\nWho chaired the meeting?\nAnswer:",
    "The committee met on Tuesday to discuss the budget.\nWho took the notes?\nAnswer:",
    "Q: what is seven times six?\nA:",
    "hi",
    "A long sentence that nobody else shares, about rivers and mountains and the sea\nAnswer:",
]
WORDS = [" the chair", " the secretary", " nobody", " 42", " a", " the chair of the board", " x y z", " rivers"]


def _requests(k: int | None, seed: int = 0) -> list[LoglikRequest]:
    """One request per context with k continuations (k=None: 1..5 varying per request)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, c in enumerate(CONTEXTS):
        kk = k if k is not None else 1 + n % 5
        out.append(LoglikRequest(c, tuple(str(w) for w in rng.choice(WORDS, size=kk, replace=False))))
    return out


def _tiny(fam, **kw):
    long = {"n_positions": 512} if fam == "gpt2" else {"max_position_embeddings": 512}
    return tiny_handle(fam, **long, **kw)


def _close(a, b, atol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("fam", DECODERS + EXTRA_DECODERS)
def test_loglikelihood_equals_naive_for_any_k(fam, monkeypatch):
    h = _tiny(fam)
    assert lm_packed.packed_ok(h.model), fam
    for k in (1, 2, 3, 5, None):
        reqs = _requests(k, seed=k or 0)
        naive = lm.loglikelihood_naive(h, reqs)
        for bs in (1, 3, 8):
            _close(lm.loglikelihood(h, reqs, batch_size=bs), naive)
    # the KV-cache fallback gives the same numbers (constant and varying K)
    monkeypatch.setattr(lm_packed, "packed_ok", lambda model: False)
    monkeypatch.setattr(lm_packed, "loglik_packed", None)  # must not be reached
    for k in (1, 3, None):
        reqs = _requests(k)
        _close(lm.loglikelihood(h, reqs, batch_size=3), lm.loglikelihood_naive(h, reqs))


def test_packed_and_kv_paths_agree_and_rows_share(monkeypatch):
    h = _tiny("llama")
    reqs = _requests(None)
    p_lists, _ = lm.encode_requests(h.tokenizer, reqs)
    assert [0, 1] in lm_packed.share_rows(p_lists, 8)  # the two committee prompts share a row
    packed = lm.loglikelihood(h, reqs, batch_size=8)
    calls = []
    real = lm_packed.loglik_kv
    monkeypatch.setattr(lm_packed, "loglik_kv", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(lm_packed, "packed_ok", lambda model: False)
    kv = lm.loglikelihood(h, reqs, batch_size=8)
    assert calls
    _close(packed, kv, atol=1e-5)


def test_normalize_modes_and_contract():
    h = _tiny("llama")
    reqs = _requests(3)
    s = lm.loglikelihood(h, reqs, batch_size=4)
    assert all(v.dtype == np.float64 and v.shape == (3,) for v in s)
    assert np.stack(s).shape == (len(reqs), 3)
    tok = lm.loglikelihood(h, reqs, batch_size=4, normalize="tokens")
    _close(tok, [v / np.array([len(c.encode()) for c in r.continuations]) for v, r in zip(s, reqs)], atol=1e-6)
    ch = lm.loglikelihood(h, reqs, batch_size=4, normalize="chars")
    _close(ch, [v / np.array([len(c) for c in r.continuations]) for v, r in zip(s, reqs)], atol=1e-6)
    assert lm.loglikelihood(h, [], batch_size=3) == []
    with pytest.raises(ExciseError, match="normalize"):
        lm.loglikelihood(h, reqs, normalize="bytes")
    with pytest.raises(ExciseError, match="batch_size"):
        lm.loglikelihood(h, reqs, batch_size=0)
    with pytest.raises(ExciseError, match="continuations"):
        LoglikRequest("ctx", " a")  # a string is not a tuple of continuations
    with pytest.raises(ExciseError, match="tokenizes to nothing"):
        lm.loglikelihood(h, [LoglikRequest("ctx", (" a", ""))])


def test_model_override_and_backend():
    h, other = _tiny("llama"), _tiny("llama", seed=1)
    reqs = _requests(2)
    _close(lm.loglikelihood(h, reqs, model=other.model), lm.loglikelihood(other, reqs))
    _close(lm.loglikelihood(lm.Backend(other.model, other.tokenizer), reqs), lm.loglikelihood(other, reqs))


def test_special_tokens_per_context():
    """A chat-formatted context gets no second set of special tokens; a plain one gets them."""
    h = _tiny("llama")
    p, o = lm.encode_requests(h.tokenizer, [LoglikRequest("<|im_start|>user\nhi", (" a",)), LoglikRequest("hi", (" a",))])
    assert p[0][0] != h.tokenizer.bos_token_id and p[1][0] == h.tokenizer.bos_token_id
    assert o == [[h.tokenizer.encode(" a")], [h.tokenizer.encode(" a")]]


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gemma2"])
def test_choice_logprobs_is_differentiable_and_equals_loglikelihood(fam):
    h = _tiny(fam)
    reqs = _requests(3)
    lp = lm.choice_logprobs(h, [r.context for r in reqs], [r.continuations for r in reqs])
    assert lp.shape == (len(reqs), 3) and lp.requires_grad
    lp.sum().backward()
    assert any(p.grad is not None for p in h.model.parameters())
    ref = np.stack(lm.loglikelihood(h, reqs))
    np.testing.assert_allclose(lp.detach().double().numpy(), ref, atol=1e-4)
    norm = lm.choice_logprobs(h, [r.context for r in reqs], [r.continuations for r in reqs], length_norm=True)
    lens = np.array([[len(c.encode()) for c in r.continuations] for r in reqs])
    np.testing.assert_allclose(norm.detach().double().numpy(), ref / lens, atol=1e-4)
    with pytest.raises(ExciseError, match="same number"):
        lm.choice_logprobs(h, ["a", "b"], [(" x",), (" x", " y")])


def test_next_token_logprobs_sum_the_sets():
    h = _tiny("qwen2")
    ctx = CONTEXTS[:4]
    sets = [[10, 11], [12], [13, 14, 15]]
    got = lm.next_token_logprobs(h, ctx, sets, batch_size=3)
    for n, c in enumerate(ctx):
        ids = torch.tensor([h.tokenizer.encode(c, add_special_tokens=True)])
        with torch.inference_mode():
            lp = torch.log_softmax(h.model(input_ids=ids).logits[0, -1].double(), -1)
        np.testing.assert_allclose(got[n], [float(torch.logsumexp(lp[s], 0)) for s in sets], atol=1e-4)


@pytest.mark.parametrize("fam", DECODERS)
def test_generate_equals_hf_generate_per_prompt(fam):
    h = _tiny(fam)
    prompts = CONTEXTS + ["x"]
    h.model.train()
    got = lm.generate(h, prompts, max_new_tokens=6, batch_size=4)
    assert h.model.training  # the mode is restored
    h.model.eval()
    tok = h.tokenizer
    for p, g in zip(prompts, got):
        ids = torch.tensor([tok.encode(p, add_special_tokens=True)])
        with torch.inference_mode():
            ref = h.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert g == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True), (fam, p)
    assert lm.generate(h, prompts[::-1], max_new_tokens=6, batch_size=2) == got[::-1]  # order-independent
    assert lm.generate(h, [], max_new_tokens=3) == []


def test_generate_falls_back_to_hf_generate_with_logits_processors():
    """A generation config that changes greedy decoding (repetition penalty) goes through model.generate."""
    from excise.lm import _lean_greedy_ok

    h = _tiny("llama")
    assert _lean_greedy_ok(h.model)
    h.model.generation_config.repetition_penalty = 1.5
    try:
        assert not _lean_greedy_ok(h.model)
        got = lm.generate(h, ["abcabc"], max_new_tokens=6)
        ids = torch.tensor([h.tokenizer.encode("abcabc", add_special_tokens=True)])
        with torch.inference_mode():
            ref = h.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0, eos_token_id=2)
        assert got[0] == h.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    finally:
        h.model.generation_config.repetition_penalty = 1.0


def test_lm_batch_labels():
    h = _tiny("llama")
    tok = h.tokenizer
    b = lm.lm_batch(tok, ["ab", "abcd"])
    assert b["input_ids"].shape == (2, 5)  # bos + 4 bytes
    assert b["labels"][0].tolist() == b["input_ids"][0, :3].tolist() + [-100, -100]
    assert b["labels"][1].tolist() == b["input_ids"][1].tolist()
    b = lm.lm_batch(tok, ["ab", "abcd"], prompts=["a", "abc"])
    assert b["labels"][0].tolist() == [-100, -100, b["input_ids"][0, 2].item(), -100, -100]
    assert b["labels"][1].tolist() == [-100] * 4 + [b["input_ids"][1, 4].item()]
    assert lm.lm_batch(tok, ["abcdef"], max_length=3)["input_ids"].shape == (1, 3)
