"""GPT-NeoX / Pythia: fused query_key_value, parallel attention + MLP residual by default."""

from excise.models.anatomy.spec import AnatomySpec, register

GPT_NEOX = register(
    AnatomySpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="layers",
        embed="embed_in",
        final_norm="final_layer_norm",
        attn="attention",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
    )
)
