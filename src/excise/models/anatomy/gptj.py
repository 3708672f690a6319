"""GPT-J: separate q/k/v projections, ``attn.out_proj``, parallel attention + MLP on one LayerNorm."""

from excise.models.anatomy.spec import AnatomySpec, register

GPTJ = register(
    AnatomySpec(
        family="gptj",
        model_types=("gptj",),
        layers="h",
        embed="wte",
        final_norm="ln_f",
        attn="attn",
        attn_out="attn.out_proj",
        mlp="mlp",
        mlp_down="mlp.fc_out",
    )
)
