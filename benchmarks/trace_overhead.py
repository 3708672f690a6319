"""Cost of capturing every site of every layer in one forward pass: excise vs plain vs peers.

All methods see the same token ids and attention mask (8 chat-formatted BBQ prompts, right
padded) on SmolLM2-135M-Instruct with eager attention, in one process, timed in interleaved
rounds after warm-up. Before timing, the captured tensors of each peer are compared with
excise's at real (non-pad) tokens, so every row computes the same thing.

    .venv-bench/bin/python benchmarks/trace_overhead.py          # peers installed by `make bench-deps`
    .venv/bin/python benchmarks/trace_overhead.py                # excise vs plain only
    .venv/bin/python benchmarks/trace_overhead.py --tiny-family mixtral --threads 1   # random MoE
    .venv/bin/python benchmarks/trace_overhead.py --tiny-family falcon --threads 1    # fused QKV

Every row runs in one process with the same allocator settings: by default those the CLI sets
(``excise.processes.tune_allocator``: freed activation memory is reused instead of page-faulted
afresh); ``--glibc-default`` leaves glibc as it is (every row slower, keeping activations more so).

``--tiny-family NAME`` times a random model of ``excise.testing``'s family NAME widened to
``--tiny-width`` (4 layers; MoE: 4 experts, top-2) on random token ids: plain vs every site
(``all``: on expert layers the router replaces mlp.hidden) and, for MoE, all + every expert's
hidden and out (recomputed from the fused weights, so it costs about one more expert pass).

Rows:
  plain            model(**batch), no hooks (same eager attention)
  excise           Trace(h, expand_sites("all", L)) : resid, attn.z, attn.pattern, mlp.hidden, mlp.out
  nnsight          TransformersModel wrapping the same HF module; .save() of the same module inputs/outputs
  tl (5 sites)     HookedTransformer (weights converted by TL's llama conversion, no folding)
                   run_with_cache restricted to the equivalent hooks
  tl (all hooks)   run_with_cache over every hook point (TL's default)
  tl forward       the converted HookedTransformer without hooks (its own baseline)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)


KINDS = ("resid", "attn.z", "attn.pattern", "mlp.hidden", "mlp.out")


def tl_names(l: int) -> dict[str, str]:
    """excise site -> TransformerLens hook name (same tensor, same layout)."""
    return {
        f"resid.{l}": f"blocks.{l}.hook_resid_post",
        f"attn.{l}.z": f"blocks.{l}.attn.hook_z",  # [B, T, H, Dh]
        f"attn.{l}.pattern": f"blocks.{l}.attn.hook_pattern",  # [B, H, Tq, Tk]
        f"mlp.{l}.hidden": f"blocks.{l}.mlp.hook_post",  # act(gate) * up = input of W_out
        f"mlp.{l}.out": f"blocks.{l}.hook_mlp_out",
    }


def build_tl(handle):
    """A HookedTransformer with the HF model's weights, converted by TL's own llama code, unfolded."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    with tempfile.TemporaryDirectory() as d:  # TL reads a config.json; write the loaded model's own
        handle.model.config.save_pretrained(d)
        cfg_dict = convert_hf_model_config(d)
    cfg_dict.update(dtype=handle.model.dtype, device="cpu", default_prepend_bos=False, tokenizer_name=None)
    cfg = HookedTransformerConfig(**cfg_dict)
    tl = HookedTransformer(cfg, move_to_device=False)  # fed token ids: no tokenizer needed
    sd = convert_llama_weights(handle.model, cfg)
    tl.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    tl.eval()
    return tl


def max_diff(a, b, mask, kind: str) -> float:
    """Max |a - b| over real tokens (real query rows x real key columns for patterns)."""
    import torch

    a, b = a.float(), b.float()
    if kind == "attn.pattern":  # [B, H, T, T]: compare real query rows and real key columns
        m = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
        m = m.expand_as(a)
    else:
        m = mask.bool().view(*mask.shape, *([1] * (a.dim() - 2))).expand_as(a)
    return float((a - b).abs()[m].max()) if m.any() else float("nan")


def build_methods(h, batch, skip=()):
    """name -> (fn, to_sites): ``fn()`` runs one forward pass with its captures (what is timed);
    ``to_sites(fn())`` gives (logits, {excise site name: tensor}) for the agreement check."""
    import torch

    from excise.trace import Trace, expand_sites

    L = h.anatomy.n_layers
    sites = expand_sites("all", L)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    methods, notes = {}, {}

    def plain():
        with torch.inference_mode():
            return h.model(**batch).logits

    def excise():
        with torch.inference_mode(), Trace(h, sites) as tr:
            logits = h.model(**batch).logits
        return logits, tr.cache

    methods["plain"] = (plain, lambda out: (out, {}))
    methods["excise"] = (excise, lambda out: out)

    if "nnsight" not in skip and importlib.util.find_spec("nnsight"):
        from nnsight import TransformersModel

        lm = TransformersModel(h.model, tokenizer=h.tokenizer, task="text-generation")
        layers = lm.model.layers
        heads = h.anatomy.n_heads

        def nns():
            out = {}
            with torch.inference_mode(), lm.trace(input_ids=ids, attention_mask=mask):
                # module accesses follow execution order within each layer (nnsight >= 0.5 requires it)
                for l in range(L):
                    attn = layers[l].self_attn
                    out[f"attn.{l}.z"] = attn.o_proj.input.save()
                    out[f"attn.{l}.pattern"] = attn.output[1].save()
                    out[f"mlp.{l}.hidden"] = layers[l].mlp.down_proj.input.save()
                    out[f"mlp.{l}.out"] = layers[l].mlp.down_proj.output.save()
                    o = layers[l].output
                    out[f"resid.{l}"] = (o[0] if isinstance(o, tuple) else o).save()
                logits = lm.lm_head.output.save()
            return logits, out

        def nns_sites(out):
            logits, cache = out
            return logits, {k: (v.view(*v.shape[:-1], heads, -1) if k.endswith(".z") else v) for k, v in cache.items()}

        methods["nnsight"] = (nns, nns_sites)
        notes["nnsight"] = f"nnsight {importlib.metadata.version('nnsight')}"

    if "tl" not in skip and importlib.util.find_spec("transformer_lens"):
        tl = build_tl(h)
        names = {}
        for l in range(L):
            names.update(tl_names(l))
        wanted = set(names.values())

        def tl5():
            with torch.inference_mode():
                return tl.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in wanted)

        def tlall():
            with torch.inference_mode():
                return tl.run_with_cache(ids, attention_mask=mask)

        def tlfwd():
            with torch.inference_mode():
                return tl(ids, attention_mask=mask)

        def tl_sites(out):
            logits, cache = out
            return logits, {s: cache[n] for s, n in names.items()}

        methods["tl (5 sites)"] = (tl5, tl_sites)
        methods["tl (all hooks)"] = (tlall, tl_sites)
        methods["tl forward"] = (tlfwd, lambda out: (out, {}))
        notes["tl (5 sites)"] = f"transformer-lens {importlib.metadata.version('transformer-lens')}"
        _, full = tlall()
        notes["tl (all hooks)"] = f"{len(full)} hook points cached"
        del full
    return methods, notes


def agreement(h, methods, mask):
    """Max |peer - excise| per site kind at real tokens, and max |excise| per kind (the scale)."""
    import torch

    from excise.trace import parse_site

    fn, conv = methods["excise"]
    ref_logits, ref = conv(fn())
    kind = {s: parse_site(s).kind for s in ref}
    scale = {"logits": max_diff(ref_logits, torch.zeros_like(ref_logits), mask, "logits")}
    for k in KINDS:
        scale[k] = max(max_diff(ref[s], torch.zeros_like(ref[s]), mask, k) for s in ref if kind[s] == k)
    agree = {}
    for name, (fn, conv) in methods.items():
        if name == "excise":
            continue
        logits, cache = conv(fn())
        d = {"logits": max_diff(logits, ref_logits, mask, "logits")}
        for k in KINDS:
            got = [max_diff(cache[s], ref[s], mask, k) for s in ref if kind[s] == k and s in cache]
            if got:
                d[k] = max(got)
        if len(cache) not in (0, len(ref)):
            raise RuntimeError(f"{name} captured {len(cache)} sites, excise {len(ref)}")
        agree[name] = d
    return agree, scale


_WIDTH = ("hidden_size", "n_embd", "d_model")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_FFN = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size")


def tiny_family(args) -> int:
    """Trace-everything overhead on a widened random model of one family (no download, no peers)."""
    import torch

    from excise.testing import TINY, tiny_handle
    from excise.trace import Trace, expand_sites

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    W = args.tiny_width
    over = {k: W for k in TINY[args.tiny_family] if k in _WIDTH}
    over.update({k: 4 for k in TINY[args.tiny_family] if k in _LAYERS})
    over.update({k: 2 * W for k in TINY[args.tiny_family] if k in _FFN})
    over.update({k: W // 32 for k in TINY[args.tiny_family] if k in ("num_attention_heads", "n_head")})
    h = tiny_handle(args.tiny_family, **over)
    an = h.anatomy
    ids = torch.randint(3, 250, (args.n_prompts, args.tiny_tokens))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sites = expand_sites("all", an.n_layers, moe_layers=an.moe_layers, n_experts=an.n_experts)
    experts = sites + expand_sites("mlp.*.expert.*.hidden, mlp.*.expert.*.out", an.n_layers,
                                   moe_layers=an.moe_layers, n_experts=an.n_experts) if an.moe_layers else None

    def run(capture):
        def fn():
            with torch.inference_mode(), Trace(h, capture or []):
                return h.model(**batch).logits
        return fn

    methods = {"plain": run(None), "excise (all)": run(sites)}
    if experts:
        methods["excise (all + experts)"] = run(experts)
    cpu: dict[str, list[float]] = {}
    times = _common.time_interleaved(methods, args.repeats, args.warmup, cpu=cpu)
    rows, res = [], {}
    for name, xs in times.items():
        med, ratio = _common.median_ci(xs), _common.ratio_ci(xs, times["plain"])
        res[name] = {"median_ms": med.as_dict(), "ratio_to_plain": ratio.as_dict(), "times_ms": xs}
        rows.append([name, f"{med.value:.1f} [{med.lo:.1f}, {med.hi:.1f}]",
                     f"{ratio.value:.3f} [{ratio.lo:.3f}, {ratio.hi:.3f}]"])
    n_sites = {"excise (all)": len(sites), "excise (all + experts)": len(experts or [])}
    header = ["method", f"wall median ms (95% CI, n={args.repeats})", "x plain"]
    desc = (f"{args.tiny_family}: {an.n_layers} layers, d_model {an.d_model}, {an.n_heads} heads"
            + (f", {an.n_experts} experts top-{an.top_k}" if an.moe_layers else "")
            + f"; batch {tuple(ids.shape)}; sites {n_sites}")
    print(desc + "\n\n" + _common.table(rows, header))
    _common.save(f"trace_overhead_tiny_{args.tiny_family}", {
        "args": vars(args), "machine": _common.machine(), "model": desc, "results": res,
        "table": _common.table(rows, header)})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny-family", default=None, help="time a random model of this excise.testing family instead")
    ap.add_argument("--tiny-width", type=int, default=256, help="--tiny-family: d_model (heads = width / 32)")
    ap.add_argument("--tiny-tokens", type=int, default=128, help="--tiny-family: tokens per sequence")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated rows to skip (nnsight, tl)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc as it is (default: excise.processes.tune_allocator, as the CLI does)")
    args = ap.parse_args(argv)
    from excise.processes import tune_allocator

    args.allocator = "glibc default" if args.glibc_default or not tune_allocator() else "tuned (tune_allocator)"
    print(f"allocator: {args.allocator}", flush=True)
    if args.tiny_family:
        return tiny_family(args)

    import torch

    from excise.models import load
    from excise.run import seed_everything
    from excise.trace import expand_sites

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    h = load("smollm2-135m-instruct", attn_implementation="eager")
    L = h.anatomy.n_layers
    sites = expand_sites("all", L)
    prompts = _common.bbq_prompts(h, args.n_prompts, seed=args.seed)
    batch = h.encode(prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    print(f"batch: {tuple(ids.shape)} tokens ({int(mask.sum())} real), {len(sites)} sites", flush=True)

    methods, notes = build_methods(h, batch, skip)
    agree, scale = agreement(h, methods, mask)
    print("agreement with excise: max abs diff at real tokens (relative to max |excise value|)", flush=True)
    for m, d in agree.items():
        print(f"  {m:8s} " + "  ".join(f"{k}={v:.1e} ({v / scale[k]:.0e})" for k, v in d.items()), flush=True)

    methods = {k: fn for k, (fn, _) in methods.items()}
    cpu: dict[str, list[float]] = {}
    times = _common.time_interleaved(methods, args.repeats, args.warmup, cpu=cpu)
    rows, res = [], {}
    ci = lambda e, f: f"{e.value:{f}} [{e.lo:{f}}, {e.hi:{f}}]"  # noqa: E731
    for name, xs in times.items():
        med, ratio = _common.median_ci(xs), _common.ratio_ci(xs, times["plain"])
        cmed, cratio = _common.median_ci(cpu[name]), _common.ratio_ci(cpu[name], cpu["plain"])
        res[name] = {"times_ms": xs, "median_ms": med.as_dict(), "ratio_to_plain": ratio.as_dict(),
                     "cpu_ms": cpu[name], "cpu_median_ms": cmed.as_dict(), "cpu_ratio_to_plain": cratio.as_dict()}
        rows.append([name, ci(med, ".0f"), ci(ratio, ".2f"), ci(cmed, ".0f"), ci(cratio, ".2f"), notes.get(name, "")])
    mach = _common.machine()
    header = ["method", f"wall median ms (95% CI, n={args.repeats})", "wall x plain", "CPU median ms",
              "CPU x plain", "note"]
    print()
    print(_common.table(rows, header))
    print(f"\nload average during run: {mach['loadavg_1_5_15']} on {mach['cores']} cores, torch threads {args.threads}")
    _common.save("trace_overhead", {
        "args": vars(args), "machine": mach, "batch_shape": list(ids.shape), "real_tokens": int(mask.sum()),
        "n_sites": len(sites), "agreement_max_abs_diff": agree, "reference_max_abs": scale, "results": res, "table": _common.table(rows, header),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
