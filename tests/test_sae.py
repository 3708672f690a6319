"""Sparse autoencoders: recovery of a known dictionary, determinism, SAELens-format files, AUROC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from excise.config import validate
from excise.errors import ExciseError
from excise.locate.sae import (SAEConfig, SparseAutoencoder, latent_auroc, load_sae, sae_metrics, save_sae,
                               top_gender_latents, train_sae)
from excise.measure.stats import bootstrap

D_IN, N_FEAT, ACTIVE = 32, 48, 3


def _synthetic(n: int = 4096, seed: int = 0):
    """x = sum of ACTIVE of N_FEAT unit ground-truth directions (positive sizes) + offset + small noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(N_FEAT, D_IN, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, N_FEAT, generator=g).argsort(1)[:, :ACTIVE]
    c = torch.zeros(n, N_FEAT).scatter_(1, idx, torch.rand(n, ACTIVE, generator=g) * 2 + 0.5)
    return c @ D + 0.01 * torch.randn(n, D_IN, generator=g) + 3.0, D


@pytest.fixture(scope="module")
def data():
    x, D = _synthetic()
    return x[:3584], x[3584:], D


CFGS = {"topk": SAEConfig(architecture="topk", k=ACTIVE, d_sae=N_FEAT, epochs=30),
        "l1": SAEConfig(architecture="l1", l1_coeff=0.1, d_sae=N_FEAT, epochs=30)}


@pytest.fixture(scope="module")
def trained(data, one_thread):
    return {a: train_sae(data[0], cfg) for a, cfg in CFGS.items()}


@pytest.mark.parametrize("arch", list(CFGS))
def test_recovers_known_dictionary(trained, data, arch):
    sae, hist = trained[arch]
    m = sae_metrics(sae, data[1])
    assert m["n"] == len(data[1]) and m["explained_variance"] > 0.9, m
    assert m["dead_share"] <= 0.1, m
    dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    recovered = ((data[2] @ dec.T).max(1).values > 0.9).float().mean()
    assert recovered >= 0.9, f"{arch}: only {recovered:.2f} of the ground-truth directions recovered"
    assert len(hist["loss"]) == CFGS[arch].epochs and hist["act_scale"] > 0
    if arch == "topk":
        assert m["l0"] == ACTIVE
        assert bool(((sae.encode(data[1]) > 0).sum(1) <= ACTIVE).all())


def test_sae_works_in_callers_space_and_dtype(trained, data):
    sae, _ = trained["topk"]
    x = data[1][:8]
    # normalisation is folded in: the reconstruction is close in raw units, for any input dtype
    assert float((sae(x) - x).pow(2).mean()) < 0.05 * float((x - x.mean(0)).pow(2).mean()) + 1e-3
    out = sae(x.double())
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert sae.encode(x).shape == (8, N_FEAT) and sae.decode(sae.encode(x)).shape == x.shape


def test_same_seed_same_weights(data, one_thread):
    cfg = SAEConfig(architecture="topk", k=ACTIVE, d_sae=N_FEAT, epochs=2)
    a, _ = train_sae(data[0][:1024], cfg)
    b, _ = train_sae(data[0][:1024], cfg)
    c, _ = train_sae(data[0][:1024], cfg.model_copy(update={"seed": 1}))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    assert not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("arch", list(CFGS))
def test_save_load_round_trip_in_saelens_format(trained, data, tmp_path, arch):
    sae, _ = trained[arch]
    p = save_sae(sae, tmp_path / arch, hook_name="resid.2", model_name="tiny", config=CFGS[arch])
    cfg = json.loads((p / "cfg.json").read_text())
    assert cfg["architecture"] == {"l1": "standard", "topk": "topk"}[arch]
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == N_FEAT and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "resid.2" and cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary left behind
    back = load_sae(p)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, k), getattr(back, k))
    assert back.architecture == arch and back.k == sae.k and back.act_scale == pytest.approx(sae.act_scale)
    assert torch.equal(sae(data[1]), back(data[1]))


def test_load_folds_saelens_topk_decoder_norms(tmp_path):
    """A SAELens topk folder trained with rescale_acts_by_decoder_norm is read with the norms folded."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(4, 6, "topk", k=2)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    p = save_sae(sae, tmp_path / "s", hook_name="h")
    cfg = json.loads((p / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = True
    (p / "cfg.json").write_text(json.dumps(cfg))
    back = load_sae(p)
    x = torch.randn(5, 4)
    norms = sae.W_dec.norm(dim=1)
    pre = sae.pre_acts(x) * norms  # what SAELens computes with the flag on
    z = torch.zeros_like(pre).scatter_(-1, pre.topk(2).indices, pre.topk(2).values.relu())
    assert torch.allclose(back(x), (z / norms) @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_latent_auroc_matches_sklearn_bootstrap():
    rng = np.random.default_rng(1)
    n = 200
    y = rng.integers(0, 2, n)
    z = np.where(rng.random((n, 3)) < 0.6, 0.0, rng.exponential(size=(n, 3)))
    z[:, 1] += 0.7 * y
    z[:, 2] = np.round(z[:, 2], 1)  # ties beyond zero
    est = latent_auroc(z, y, n_boot=100, seed=3)
    for j in range(3):
        ref = bootstrap(np.c_[z[:, j], y], lambda a: roc_auc_score(a[:, 1], a[:, 0]), n_boot=100, seed=3)
        assert est[j].value == pytest.approx(roc_auc_score(y, z[:, j]), abs=1e-12)
        assert (est[j].lo, est[j].hi, est[j].n) == (pytest.approx(ref.lo, abs=1e-12), pytest.approx(ref.hi, abs=1e-12), n)
    top = top_gender_latents(z, y, n_boot=100, seed=3)
    assert top and top[0][0] == 1 and all(e.excludes(0.5) for _, e in top)


def test_latent_equal_to_label_and_undefined_cases():
    y = np.array([0, 1] * 20)
    est = latent_auroc(torch.tensor(np.c_[y, 1 - y, np.zeros(40)], dtype=torch.float32), torch.tensor(y), n_boot=50)
    assert est[0].value == 1.0 and (est[0].lo, est[0].hi) == (1.0, 1.0) and est[0].n == 40
    assert est[1].value == 0.0 and est[2].value == 0.5
    assert [i for i, _ in top_gender_latents(np.c_[y, 1 - y, np.zeros(40)], y, n_boot=50)] == [0, 1]
    one_class = latent_auroc(np.ones((5, 2)), [1] * 5)
    assert all(e.n == 0 and np.isnan(e.value) for e in one_class)


def test_bad_input_is_one_line_excise_error(tmp_path):
    for bad in ({"architecture": "gated"}, {"k": 0}, {"epochs": 0}, {"d_sae": 4, "k": 8}, {"bogus": 1}):
        with pytest.raises(ExciseError):
            validate(SAEConfig, bad, "sae")
    with pytest.raises(ExciseError, match="k=9 exceeds") as e:
        train_sae(torch.randn(16, 2), SAEConfig(k=9))  # d_sae = 4 * 2 = 8
    assert "\n" not in str(e.value)
    with pytest.raises(ExciseError, match="unknown setting"):
        train_sae(torch.randn(16, 2), {"lr_typo": 1})
    with pytest.raises(ExciseError, match=r"\[N, d_in\]"):
        train_sae(torch.randn(16), SAEConfig())
    with pytest.raises(ExciseError, match="NaN"):
        train_sae(torch.full((4, 2), float("nan")), SAEConfig(k=1))
    with pytest.raises(ExciseError, match="0 or 1"):
        latent_auroc(np.zeros((3, 1)), [0, 1, 2])
    with pytest.raises(ExciseError, match="one label per row"):
        latent_auroc(np.zeros((3, 1)), [0, 1])
    with pytest.raises(ExciseError, match="not an SAE folder"):
        load_sae(tmp_path)
    sae = SparseAutoencoder(4, 8, "topk", k=2)
    with pytest.raises(ExciseError, match="last dimension 4"):
        sae.encode(torch.zeros(2, 3))
    m = sae_metrics(sae, torch.zeros(0, 4))
    assert m["n"] == 0 and np.isnan(m["explained_variance"]) and np.isnan(m["l0"])
