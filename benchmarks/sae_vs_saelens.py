"""SAE training: excise's ``train_sae`` vs SAELens 6's ``SAETrainer`` on the same activations.

Both train on one CPU thread, on the same activations in the same per-epoch shuffled order, with
Adam at the same lr, batch size, number of epochs, dictionary size, linear lr decay over the
last 20% of steps, and SAELens' own normalisation (``expected_average_only_in``; excise does the
same scaling). Differences that are part of each method and kept: excise holds decoder rows at
unit norm and uses AuxK with coefficient 1/32 (Gao et al.); SAELens clips gradient norm at 1,
weights L1 by decoder norms, starts decoder rows at norm 0.1 and uses AuxK coefficient 1.
Dead-latent windows are the same number of inputs (SAELens counts steps: dead_after / batch).

Rows: wall and process-CPU seconds of training (including SAELens' norm estimate, excluding
import), then L0 / explained variance / dead share on held-out activations (the last 1/8), all
computed by ``excise.locate.sae.sae_metrics`` on the final weights of both (SAELens' SAE is
read through its own encode/decode via a wrapper). L1 SAEs are compared at about equal L0 by a
small sweep of the sparsity coefficient (same values for both; the two define the penalty the
same way), plus excise's EV interpolated (in log L0) at each SAELens L0.

Also: excise's saved folders are opened with ``sae_lens.SAE.load_from_disk`` and must
reconstruct like excise's own module; and the vectorised per-latent AUROC bootstrap is timed
against calling sklearn per resample.

    .venv-bench/bin/python benchmarks/sae_vs_saelens.py                 # synthetic, N=8192, d_in=64
    .venv-bench/bin/python benchmarks/sae_vs_saelens.py --acts a.npy    # real activations [N, d_in]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' trainer draws a progress bar per run
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from excise.locate.sae import (SAEConfig, SparseAutoencoder, latent_auroc, load_sae, sae_metrics,  # noqa: E402
                               save_sae, train_sae)


def realistic_acts(n: int = 8192, d_in: int = 64, n_feat: int = 512, mean_l0: float = 8.0, seed: int = 0) -> torch.Tensor:
    """Activations shaped like a residual stream: superposed sparse features with Zipf-like
    frequencies and lognormal sizes, a large mean offset, a few high-variance coordinates, a
    low-rank dense part and isotropic noise."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_feat, d_in))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    freq = 1.0 / (np.arange(n_feat) + 10.0) ** 0.8
    freq = np.minimum(freq * mean_l0 / freq.sum(), 0.5)
    size = rng.lognormal(0.0, 0.3, n_feat)
    coef = (rng.random((n, n_feat)) < freq) * rng.lognormal(0.0, 0.5, (n, n_feat)) * size
    x = coef @ D
    x += 3.0 * rng.standard_normal(d_in) / math.sqrt(d_in) * 4.0  # mean offset ~ 3x a typical feature sum
    x += (rng.standard_normal((n, 4)) * 0.3) @ rng.standard_normal((4, d_in)) / math.sqrt(d_in)  # dense low-rank
    x[:, :2] *= 4.0  # a couple of "massive" coordinates
    x += 0.05 * rng.standard_normal((n, d_in))
    return torch.tensor(x, dtype=torch.float32)


def load_acts(path: str) -> torch.Tensor:
    if path.endswith(".npy"):
        x = torch.from_numpy(np.load(path))
    else:
        from safetensors.torch import load_file

        t = load_file(path)
        x = t["acts"] if "acts" in t else next(iter(t.values()))
    x = x.float().reshape(-1, x.shape[-1])
    return x


class _Wrapped(SparseAutoencoder):
    """A SAELens SAE behind excise's interface, so one function scores both."""

    def __init__(self, sl):
        super().__init__(sl.cfg.d_in, sl.cfg.d_sae, "topk" if sl.cfg.architecture() == "topk" else "l1",
                         getattr(sl.cfg, "k", None))
        self.sl = sl

    def encode(self, x):
        return self.sl.encode(torch.as_tensor(x, dtype=torch.float32))

    def decode(self, z):
        return self.sl.decode(z)


def _batches(x: torch.Tensor, bs: int, seed: int):
    """Endless per-epoch shuffled batches (SAELens' DataProvider)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), bs):
            yield x[perm[s:s + bs]]


def train_saelens(x: torch.Tensor, cfg: SAEConfig):
    from sae_lens import (LoggingConfig, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig,
                          TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig

    n, d_in = x.shape
    d_sae = cfg.width(d_in)
    torch.manual_seed(cfg.seed)
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
                  normalize_activations="expected_average_only_in" if cfg.normalize else "none")
    if cfg.architecture == "l1":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coeff, **common))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    tcfg = SAETrainerConfig(total_training_samples=total_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
                            lr=cfg.lr, lr_end=cfg.lr, lr_scheduler_name="constant",
                            lr_decay_steps=int(round(cfg.lr_decay * total_steps)), device="cpu",
                            dead_feature_window=max(1, cfg.dead_after // cfg.batch_size),
                            n_batches_for_norm_estimate=steps_per_epoch, logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(tcfg, sae, _batches(x, cfg.batch_size, cfg.seed))
    sae = trainer.fit()
    sae.eval()
    return sae


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def interp_ev(l0s, evs, at):
    """EV at L0 = at, interpolated linearly in log L0 between measured points (NaN outside)."""
    pts = sorted((a, b) for a, b in zip(l0s, evs) if a > 0)
    xs = [math.log(p[0]) for p in pts]
    if not pts or at <= 0 or not xs[0] <= math.log(at) <= xs[-1]:
        return float("nan")
    return float(np.interp(math.log(at), xs, [p[1] for p in pts]))


def check_saelens_loads(sae: SparseAutoencoder, x: torch.Tensor) -> dict:
    """Save with excise, open with SAELens, compare reconstructions."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as d:
        p = save_sae(sae, Path(d) / "sae", hook_name="blocks.0.hook_resid_post", model_name="synthetic")
        try:
            sl = SAE.load_from_disk(str(p))
        except Exception as e:  # report exactly why, do not hide it
            return {"loads": False, "why": f"{type(e).__name__}: {e}"}
        ours = load_sae(p)
    with torch.no_grad():
        a, b = sae(x), sl(x)
        za, zb = sae.encode(x), sl.encode(x)
    return {"loads": True, "class": type(sl).__name__, "max_abs_diff_recon": float((a - b).abs().max()),
            "same_active_latents": bool(torch.equal(za > 0, zb > 0)),
            "roundtrip_identical": all(torch.equal(getattr(sae, k), getattr(ours, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))}


def auroc_timing(n: int = 4096, k: int = 256, n_boot: int = 1000, sk_latents: int = 4) -> dict:
    from sklearn.metrics import roc_auc_score

    from excise.measure.stats import bootstrap

    rng = np.random.default_rng(0)
    z = np.where(rng.random((n, k)) < 0.9, 0.0, rng.exponential(size=(n, k)))
    y = rng.integers(0, 2, n)
    est, w, c = timed(lambda: latent_auroc(z, y, n_boot=n_boot))
    t_sk, c_sk, same = 0.0, 0.0, True
    for j in range(sk_latents):
        ref, tw, tc = timed(lambda: bootstrap(np.c_[z[:, j], y], lambda a: roc_auc_score(a[:, 1], a[:, 0]), n_boot=n_boot, seed=0))
        t_sk, c_sk = t_sk + tw, c_sk + tc
        same &= abs(ref.value - est[j].value) < 1e-12 and abs(ref.lo - est[j].lo) < 1e-12 and abs(ref.hi - est[j].hi) < 1e-12
    return {"n": n, "latents": k, "n_boot": n_boot, "vectorised_wall_s": w, "vectorised_cpu_s": c,
            "sklearn_wall_s_extrapolated": t_sk / sk_latents * k, "sklearn_cpu_s_extrapolated": c_sk / sk_latents * k,
            "sklearn_latents_timed": sk_latents, "identical_estimates": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acts", help=".npy or .safetensors activations [N, d_in] (default: synthetic)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=None, help="dictionary size (overrides --expansion)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--l1", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--quick", action="store_true", help="few epochs, one l1 value (smoke)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import sae_lens  # noqa: F401  (imported before timing: import cost is not training cost)

    if args.quick:
        args.epochs, args.l1, args.n = 3, [1.0], min(args.n, 2048)
    x = load_acts(args.acts) if args.acts else realistic_acts(args.n, args.d_in)
    n_test = len(x) // 8
    train, test = x[:-n_test], x[-n_test:]
    base = dict(expansion=args.expansion, d_sae=args.d_sae, epochs=args.epochs)
    runs = [("topk", dict(architecture="topk", k=args.k))] + [(f"l1 {c:g}", dict(architecture="l1", l1_coeff=c)) for c in args.l1]
    rows, res = [], {}
    for name, kw in runs:
        cfg = SAEConfig(**base, **kw)
        for impl in ("excise", "saelens"):
            if impl == "excise":
                (sae, _), w, c = timed(lambda: train_sae(train, cfg))
            else:
                sl, w, c = timed(lambda: train_saelens(train, cfg))
                sae = _Wrapped(sl)
            m = sae_metrics(sae, test)
            res[(name, impl)] = dict(m, wall_s=w, cpu_s=c)
            rows.append([name, impl, f"{w:.2f}", f"{c:.2f}", f"{m['l0']:.2f}", f"{m['explained_variance']:.4f}",
                         f"{m['dead_share']:.3f}"])
            print(f"  {name:8s} {impl:8s} wall {w:6.2f}s cpu {c:6.2f}s L0 {m['l0']:6.2f} EV {m['explained_variance']:.4f}", flush=True)
            if impl == "excise":
                res[(name, "sae")] = sae
    env = _common.machine()
    print(f"\nactivations: {'file ' + args.acts if args.acts else 'synthetic (realistic_acts)'}, train {len(train)}, "
          f"held-out {len(test)}, d_in {x.shape[1]}, d_sae {cfg.width(x.shape[1])}, epochs {args.epochs}, "
          f"batch {cfg.batch_size}, lr {cfg.lr}; one torch thread; sae-lens {importlib.metadata.version('sae-lens')}, "
          f"torch {torch.__version__}, loadavg {env['loadavg_1_5_15']}\n")
    print(_common.table(rows, ["sae", "impl", "wall s", "CPU s", "L0", "explained var", "dead share"]))
    l1 = [r for r, _ in runs if r.startswith("l1")]
    if len(l1) > 1:
        print("\nl1 at equal L0: each side's EV interpolated (log L0) at the other side's measured L0")
        curve = {i: ([res[(r, i)]["l0"] for r in l1], [res[(r, i)]["explained_variance"] for r in l1])
                 for i in ("excise", "saelens")}
        eq = []
        for r in l1:
            for me, other in (("saelens", "excise"), ("excise", "saelens")):
                l0, ev = res[(r, me)]["l0"], res[(r, me)]["explained_variance"]
                eq.append([r, me, f"{l0:.2f}", f"{ev:.4f}", f"{interp_ev(*curve[other], l0):.4f}"])
        print(_common.table(eq, ["coeff", "measured", "L0", "its EV", "other's EV at that L0"]))
    ws = {impl: sum(v["wall_s"] for (r, i), v in res.items() if i == impl and isinstance(v, dict)) for impl in ("excise", "saelens")}
    cs = {impl: sum(v["cpu_s"] for (r, i), v in res.items() if i == impl and isinstance(v, dict)) for impl in ("excise", "saelens")}
    print(f"\ntotal training: excise {ws['excise']:.1f}s wall / {cs['excise']:.1f}s CPU, "
          f"SAELens {ws['saelens']:.1f}s wall / {cs['saelens']:.1f}s CPU")
    loads = {r: check_saelens_loads(res[(r, "sae")], test) for r in (runs[0][0], runs[1][0])}
    print("\nSAELens opens excise's saved folders (SAE.load_from_disk):")
    for r, v in loads.items():
        print(f"  {r}: {v}")
    at = auroc_timing(n_boot=200 if args.quick else 1000, sk_latents=1 if args.quick else 4)
    print(f"\nper-latent AUROC with 95% bootstrap CI ({at['latents']} latents, N={at['n']}, {at['n_boot']} resamples): "
          f"vectorised {at['vectorised_wall_s']:.1f}s wall / {at['vectorised_cpu_s']:.1f}s CPU; sklearn per resample "
          f"~{at['sklearn_wall_s_extrapolated']:.0f}s wall / {at['sklearn_cpu_s_extrapolated']:.0f}s CPU "
          f"(extrapolated from {at['sklearn_latents_timed']} latents); identical estimates: {at['identical_estimates']}")
    if not args.quick:
        _common.save("sae_vs_saelens", {"machine": env, "args": vars(args),
                                        "rows": {f"{r}|{i}": v for (r, i), v in res.items() if isinstance(v, dict)},
                                        "saelens_loads": loads, "auroc": at})


if __name__ == "__main__":
    main()
