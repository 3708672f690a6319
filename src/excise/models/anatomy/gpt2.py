"""GPT-2: Conv1D layers store their weight as [in_features, out_features] (transposed)."""

from excise.models.anatomy.spec import AnatomySpec, register

GPT2 = register(
    AnatomySpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="h",
        embed="wte",
        final_norm="ln_f",
        attn="attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        attn_out_transposed=True,
        mlp_down_transposed=True,
    )
)
