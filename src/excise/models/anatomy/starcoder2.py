"""StarCoder2: llama-style attention (q/k/v/o), LayerNorm, and a plain two-layer MLP (c_fc, c_proj)."""

from excise.models.anatomy.spec import AnatomySpec, register

STARCODER2 = register(
    AnatomySpec(
        family="starcoder2",
        model_types=("starcoder2",),
        layers="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
    )
)
