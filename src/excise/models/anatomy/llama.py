"""Llama-style decoders (pre-norm, q/k/v/o projections, gated MLP): llama, mistral, qwen2, qwen3,
olmo/olmo2, smollm3, and the same module layout in granite (scalar multipliers on embeddings,
residuals and logits), cohere (parallel attention + MLP from one layernorm) and stablelm
(LayerNorm, partial rotary, optional parallel residual), and the language models inside Qwen2-VL and
Qwen2.5-VL (``qwen2_vl_text``, ``qwen2_5_vl_text``).

Grouped-query attention needs nothing special here: heads are split at the *input* of
``o_proj``, which always has ``num_attention_heads * head_dim`` features.
"""

from excise.models.anatomy.spec import AnatomySpec, register

LLAMA = register(
    AnatomySpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "smollm3",
                     "granite", "cohere", "stablelm", "qwen2_vl_text", "qwen2_5_vl_text"),
        layers="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_down="mlp.down_proj",
    )
)
