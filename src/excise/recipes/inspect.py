"""`excise inspect`: print a model's anatomy, trace a handful of BBQ prompts, save heatmaps.

Writes into a run directory: ``inspect/attention_patterns.png`` (one panel per sampled layer,
mean over heads), ``inspect/attention_last_token.png`` (layer x head: attention mass the last
token puts on the context), ``inspect/mlp_out_norms.png`` and ``inspect/hidden_state_norms.png``
(layer x token L2 norms), and ``inspect/summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, Field

from excise.config import Device, validate
from excise.errors import ExciseError
from excise.io import atomic_write_json
from excise.models import load
from excise.report.plots import grid_heatmaps, heatmap
from excise.run import Run, seed_everything
from excise.tasks.bbq import check_category_list, format_prompt, load_bbq
from excise.trace import Trace


class InspectConfig(BaseModel):
    """Settings of the inspect job."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}
    model: str = Field("smollm2-135m-instruct", description="embedded default, local directory or hub id")
    n_prompts: int = Field(4, ge=1, le=64, description="BBQ prompts to trace (one per category, in order)")
    categories: Annotated[list[str], AfterValidator(check_category_list)] = Field(
        default_factory=lambda: ["Age", "Gender_identity", "Religion", "SES"],
                                  description="BBQ categories to draw prompts from")
    layers_shown: int = Field(8, ge=1, description="layers shown in the attention-pattern grid")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    device: Device = Field("cpu", description="cpu, cuda, cuda:N or mps")
    seed: int = Field(0, description="seed (tracing is deterministic; kept for the run snapshot)")


def run_inspect(cfg: InspectConfig, out: str | Path, *, force: bool = False, console: Any = None) -> dict:
    # run-directory checks first: bad input fails fast, before the model is loaded
    run = Run(out, {"workflow": "inspect", **cfg.model_dump()}, force=force)
    if run.is_done("inspect"):  # resumed: no need to load the model again
        res = run.stage("inspect", lambda d: None)
        return {"dir": str(res.dir), "metrics": res.metrics, "skipped": res.skipped}
    t0 = time.time()
    handle = load(cfg.model, dtype=cfg.dtype, device=cfg.device, attn_implementation="eager")
    load_s = time.time() - t0
    seed_everything(cfg.seed)

    an = handle.anatomy
    if console is not None:
        _print_anatomy(console, handle)

    def stage(d: Path) -> dict:
        per_cat = max(1, -(-cfg.n_prompts // len(cfg.categories)))
        items = load_bbq(cfg.categories, limit_per_category=per_cat)[: cfg.n_prompts]
        # interleave categories so a small n still covers several
        texts = [handle.chat(format_prompt(it)) for it in items]
        batch = handle.encode(texts)
        _check_length(handle, batch["input_ids"].shape[1])
        t1 = time.time()
        with torch.inference_mode(), Trace(handle, ["resid.*", "attn.*.pattern", "mlp.*.out"]) as tr:
            out_ = handle.model(**batch)
        trace_s = time.time() - t1
        mask = batch["attention_mask"]
        n0 = int(mask[0].sum())
        tokens = [handle.tokenizer.decode([t]) for t in batch["input_ids"][0, :n0].tolist()]
        L = an.n_layers
        shown = sorted(set(int(round(x)) for x in torch.linspace(0, L - 1, min(cfg.layers_shown, L)).tolist()))
        pats = [tr.cache[f"attn.{l}.pattern"][0, :, :n0, :n0].mean(0).float().cpu().numpy() for l in shown]
        grid_heatmaps(pats, [f"layer {l} (mean over {an.n_heads} heads)" for l in shown], d / "attention_patterns.png",
                      suptitle=f"{cfg.model}: attention patterns, prompt 0 ({items[0].category})")
        # attention from the last real token, per layer x head: fraction on the context tokens
        ctx_end = _context_end(handle, items[0], tokens)
        last_rows = torch.stack([tr.cache[f"attn.{l}.pattern"][0, :, n0 - 1, :n0] for l in range(L)])  # [L,H,T]
        ctx_mass = last_rows[:, :, :ctx_end].sum(-1).float().cpu().numpy()
        heatmap(ctx_mass, d / "attention_last_token.png", title="attention of the last token on the context",
                xlabel="head", ylabel="layer", colorbar_label="attention mass")
        mlp_norm = torch.stack([tr.cache[f"mlp.{l}.out"][0, :n0].norm(dim=-1) for l in range(L)]).float().cpu().numpy()
        resid_norm = torch.stack([tr.cache[f"resid.{l}"][0, :n0].norm(dim=-1) for l in range(L)]).float().cpu().numpy()
        short = [t.replace("\n", "\\n")[:8] for t in tokens]
        heatmap(mlp_norm, d / "mlp_out_norms.png", title="MLP output L2 norm (prompt 0)", xlabel="token", ylabel="layer",
                xticklabels=short if n0 <= 120 else None)
        heatmap(resid_norm, d / "hidden_state_norms.png", title="hidden state (residual) L2 norm (prompt 0)",
                xlabel="token", ylabel="layer", xticklabels=short if n0 <= 120 else None)
        logits = out_.logits
        last = (mask.sum(1) - 1)
        next_tok = logits[torch.arange(len(texts)), last].argmax(-1).tolist()
        summary = {
            "model": cfg.model,
            "source": handle.source,
            "anatomy": an.describe(),
            "prompts": [{"category": it.category, "example_id": it.example_id, "context_condition": it.context_condition,
                         "n_tokens": int(mask[i].sum()), "next_token": handle.tokenizer.decode([next_tok[i]])}
                        for i, it in enumerate(items)],
            "sites_traced": len(tr.cache),
            "mean_mlp_out_norm_by_layer": mlp_norm.mean(1).round(4).tolist(),
            "mean_resid_norm_by_layer": resid_norm.mean(1).round(4).tolist(),
            "last_token_context_attention_by_layer": ctx_mass.mean(1).round(4).tolist(),
            "seconds": {"load": round(load_s, 2), "trace": round(trace_s, 3)},
            "files": ["attention_patterns.png", "attention_last_token.png", "mlp_out_norms.png", "hidden_state_norms.png"],
        }

        atomic_write_json(d / "summary.json", summary)
        return {"n_prompts": len(items), "sites_traced": len(tr.cache), "trace_seconds": round(trace_s, 3)}

    res = run.stage("inspect", stage)
    return {"dir": str(res.dir), "metrics": res.metrics, "skipped": res.skipped}


def _check_length(handle: Any, n_tokens: int) -> None:
    """A prompt longer than the model's positions would fail deep in its forward pass (or index out of range)."""
    cfg = getattr(handle.model.config, "get_text_config", lambda: handle.model.config)()
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and n_tokens > limit:
        raise ExciseError(f"the traced prompts need {n_tokens} tokens but model '{handle.name}' has {limit} positions; "
                          "use a model with a longer context")


def _context_end(handle: Any, item: Any, tokens: list[str]) -> int:
    """Token index where the BBQ context ends (approximate, by decoded text)."""
    text = ""
    for i, t in enumerate(tokens):
        text += t
        if item.context[-20:] in text:
            return i + 1
    return len(tokens)


def _print_anatomy(console: Any, handle: Any) -> None:
    from rich.table import Table

    d = handle.anatomy.describe()
    t = Table(title=f"{handle.name} — {d['class']} ({d['family']} anatomy)", show_header=False)
    for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "d_mlp", "n_params"):
        t.add_row(k, f"{d[k]:,}")
    for k, v in d["modules"].items():
        t.add_row(f"module: {k}", v)
    t.add_row("weights from", handle.source)
    console.print(t)


def run_recipe(settings: dict, out: Path, *, force: bool = False, quick: bool = False, source: str = "recipe",
               console: Any = None) -> dict:
    cfg = validate(InspectConfig, settings, source)
    if quick:
        cfg = cfg.model_copy(update={"n_prompts": min(cfg.n_prompts, 2)})
    return run_inspect(cfg, out, force=force, console=console)
