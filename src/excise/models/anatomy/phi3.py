"""Phi-3: fused qkv_proj and gate_up_proj; o_proj and down_proj are where the sites are."""

from excise.models.anatomy.spec import AnatomySpec, register

PHI3 = register(
    AnatomySpec(
        family="phi3",
        model_types=("phi3",),
        layers="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_down="mlp.down_proj",
    )
)
