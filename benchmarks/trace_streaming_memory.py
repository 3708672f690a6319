"""Peak memory of streaming activations to disk: N samples vs 10N samples.

``excise.trace_store.trace_dataset`` keeps at most one shard in memory, so tracing 10x more samples
should not raise peak RSS. Each size runs in a fresh subprocess (peak RSS is per process and
never goes down). After loading the model and one warm-up batch, the child resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``) and reports RSS then and the peak (VmHWM) after tracing,
so a transient of model loading cannot hide or fake the tracing's own growth.

    .venv/bin/python benchmarks/trace_streaming_memory.py              # N=64 and 640
    .venv/bin/python benchmarks/trace_streaming_memory.py --n 32 --sites "resid.*"
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_SITES = "resid.*,attn.*.z,mlp.*.hidden,mlp.*.out"


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss where /proc is missing), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: clear_refs 5), so the
    peak measured afterwards is the tracing's own and not the model loading's transient."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    import torch

    from excise.models import load
    from excise.run import seed_everything
    from excise.tasks.bbq import format_prompt, load_bbq
    from excise.trace_store import trace_dataset

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    h = load("smollm2-135m-instruct")
    items = load_bbq(limit_per_category=(args.samples + 10) // 11 + 1)[: args.samples]
    texts = [format_prompt(it) for it in items]
    max_t = max(min(len(ids), args.max_length) for ids in h.tokenizer(texts)["input_ids"])
    if args.logits_to_keep:
        # The proposed core fix, applied from outside: trace_dataset needs no logits, but a causal
        # LM's forward computes [B, T, vocab] of them (8 x 128 x 49152 fp32 = 201 MB at once).
        import functools

        h.model.forward = functools.partial(h.model.forward, logits_to_keep=args.logits_to_keep)
    # warm one batch so lazy allocations (kernels, tokenizer caches) count in the baseline
    with torch.inference_mode():
        h.model(**h.encode(texts[: args.batch_size], max_length=args.max_length))
    load_peak = peak_rss_mb()
    was_reset = reset_peak()
    base = rss_mb() if was_reset else load_peak
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        store = trace_dataset(h, texts, args.sites, Path(d) / "acts", pool="last", batch_size=args.batch_size,
                              shard_size=args.shard_size, max_length=args.max_length, progress=False)
        secs = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (Path(d) / "acts").iterdir()) / 2**20
        n_shards = len(store.manifest["shards"])
    print(json.dumps({"samples": len(texts), "load_peak_mb": load_peak, "peak_reset": was_reset,
                      "rss_after_load_mb": base, "peak_rss_mb": peak_rss_mb(), "rss_end_mb": rss_mb(), "max_tokens": max_t,
                      "seconds": secs, "disk_mb": disk, "shards": n_shards}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="small size N (the large one is 10N)")
    ap.add_argument("--sites", default=DEFAULT_SITES)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logits-to-keep", type=int, default=0,
                    help="pass logits_to_keep=K to the model's forward (0: off, trace_dataset as it is)")
    ap.add_argument("--samples", type=int, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.samples is not None:
        child(args)
        return 0
    rows, res = [], []
    for n in (args.n, 10 * args.n):
        cmd = [sys.executable, __file__, "--samples", str(n)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("samples", "n")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["trace_growth_mb"] = r["peak_rss_mb"] - r["rss_after_load_mb"]
        res.append(r)
        rows.append([r["samples"], r["max_tokens"], r["shards"], f"{r['disk_mb']:.1f}", f"{r['load_peak_mb']:.0f}",
                     f"{r['rss_after_load_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['trace_growth_mb']:.0f}",
                     f"{r['seconds']:.1f}"])
        print(f"  {n} samples: peak {r['peak_rss_mb']:.0f} MB", flush=True)
    ratio = res[1]["peak_rss_mb"] / res[0]["peak_rss_mb"]
    header = ["samples", "longest prompt (tokens)", "shards", "on disk MB", "load peak MB", "RSS before trace MB", "peak RSS in trace MB",
              "growth MB", "seconds"]
    tab = _common.table(rows, header)
    mach = _common.machine()
    print()
    print(tab)
    verdict = "flat (within 10%)" if ratio <= 1.10 else "NOT flat"
    print(f"\npeak RSS ratio 10N/N = {ratio:.3f} -> {verdict}; sites={args.sites}, shard_size={args.shard_size}, "
          f"batch_size={args.batch_size}, max_length={args.max_length}, logits_to_keep={args.logits_to_keep}; load {mach['loadavg_1_5_15']}")
    _common.save("trace_streaming_memory" + (f"_logits{args.logits_to_keep}" if args.logits_to_keep else ""), {"args": vars(args), "machine": mach, "results": res,
                                            "peak_ratio": ratio, "verdict": verdict, "table": tab})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
