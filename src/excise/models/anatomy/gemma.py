"""Gemma, Gemma-2 and Gemma-3 (text): llama layout, but head_dim is set explicitly in the config
(n_heads * head_dim may differ from hidden_size) and Gemma-2/3 add extra norms around the MLP (Gemma-3 also q/k norms and
sliding-window layers)."""

from excise.models.anatomy.spec import AnatomySpec, register

GEMMA = register(
    AnatomySpec(
        family="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        layers="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_down="mlp.down_proj",
        notes="mlp.out is the down-projection output, before Gemma-2/3's post-feedforward norm",
    )
)
