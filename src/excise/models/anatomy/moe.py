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
