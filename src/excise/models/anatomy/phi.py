"""Phi-1/1.5/2: one layernorm feeding attention and MLP in parallel; the attention output projection
is ``dense``, the MLP is fc1 -> fc2, the final norm ``final_layernorm``."""

from excise.models.anatomy.spec import AnatomySpec, register

PHI = register(
    AnatomySpec(
        family="phi",
        model_types=("phi",),
        layers="layers",
        embed="embed_tokens",
        final_norm="final_layernorm",
        attn="self_attn",
        attn_out="self_attn.dense",
        mlp="mlp",
        mlp_down="mlp.fc2",
        notes="parallel block: resid = resid + attn(ln(resid)) + mlp(ln(resid))",
    )
)
