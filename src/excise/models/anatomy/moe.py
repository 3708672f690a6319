"""Mixture-of-experts decoders: mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe.

Checked against transformers 5's modeling files: attention is llama's (``self_attn.o_proj``);
the MLP is a sparse block holding a top-k router (``gate`` / ``router``, returning
``(logits [N, E], top_k_weights, top_k_index)`` over the flattened tokens) and one fused experts
module (``experts.gate_up_proj`` [E, 2 * d_expert, d], ``experts.down_proj`` [E, d, d_expert]),
called as ``experts(x, top_k_index, top_k_weights)``. There is no per-expert module to hook, so
per-expert sites are recomputed from these weights (see :mod:`excise.trace`). Qwen2-MoE adds a
gated shared expert inside the block (part of ``mlp.L.out``); Qwen2/3-MoE can keep dense MLP
layers (``mlp_only_layers``, ``decoder_sparse_step``), which use ``mlp.down_proj`` as llama.
GraniteMoE names its block ``block_sparse_moe`` and scales embeddings, residuals and logits.
"""

from typing import Any

from excise.errors import ExciseError
from excise.models.anatomy.spec import AnatomySpec, register

_LLAMA_ATTN = dict(layers="layers", embed="embed_tokens", final_norm="norm", attn="self_attn",
                   attn_out="self_attn.o_proj")

MOE = register(
    AnatomySpec(
        family="moe",
        model_types=("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
        mlp="mlp",
        mlp_down="mlp.down_proj",  # dense layers only
        moe_router="mlp.gate",
        moe_experts="mlp.experts",
        **_LLAMA_ATTN,
    )
)

GRANITEMOE = register(
    AnatomySpec(
        family="granitemoe",
        model_types=("granitemoe",),
        mlp="block_sparse_moe",
        mlp_down="block_sparse_moe.down_proj",  # never present: every granitemoe layer is sparse
        moe_router="block_sparse_moe.router",
        moe_experts="block_sparse_moe.experts",
        **_LLAMA_ATTN,
    )
)


# --- mixture of experts: what one expert computes, from the fused experts module's weights ----------
def expert_activations(experts: Any, x: Any, index: Any, weights: Any,
                       e: int) -> tuple[Any, Any]:
    """(hidden [N, d_expert], out [N, d]) of expert ``e`` on the flat tokens ``x`` [N, d], zero where unrouted.

    ``hidden`` is the input of the expert's down-projection (act(gate) * up); ``out`` is what the
    block adds for it (down-projection times the routing weight), so the experts' ``out`` sum to
    the routed part of ``mlp.L.out``. transformers 5 keeps experts as fused [E, ...] tensors with
    no per-expert module, so this recomputes the eager path from the same weights.
    """
    import torch.nn.functional as F

    if getattr(experts, "has_post_expert_norm", False) or not hasattr(experts, "down_proj") \
            or not hasattr(experts, "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"):
        raise ExciseError(f"{type(experts).__name__}: per-expert sites need fused gate_up_proj/down_proj weights "
                          "without a post-expert norm; use mlp.L.router and mlp.L.out")
    routed = index == e  # [N, k]
    rows = routed.any(-1).nonzero().squeeze(-1)  # only the tokens routed to e are computed
    w = (weights * routed).sum(-1, keepdim=True)[rows]  # their routing weight
    xr = x[rows]
    has_gate = getattr(experts, "has_gate", True)
    W = (experts.gate_up_proj if has_gate else experts.up_proj)[e]
    t = getattr(experts, "is_transposed", False)
    bias = getattr(experts, ("gate_up_proj" if has_gate else "up_proj") + "_bias", None)
    gu = xr @ W if t else F.linear(xr, W)
    gu = gu + bias[e] if getattr(experts, "has_bias", False) and bias is not None else gu
    h = experts._apply_gate(gu) if has_gate else experts.act_fn(gu)
    D = experts.down_proj[e]
    o = h @ D if t else F.linear(h, D)
    dbias = getattr(experts, "down_proj_bias", None)
    o = (o + dbias[e] if getattr(experts, "has_bias", False) and dbias is not None else o) * w.to(o.dtype)
    hidden = h.new_zeros(x.shape[0], h.shape[-1]).index_copy(0, rows, h)
    out = o.new_zeros(x.shape[0], o.shape[-1]).index_copy(0, rows, o)
    return hidden, out


def scale_expert(index: Any, weights: Any, e: int, factor: float) -> Any:
    """Routing weights with expert ``e``'s scaled: scales exactly its contribution (``mlp.L.expert.E.out``)."""
    import torch

    return torch.where(index == e, weights * factor, weights)
