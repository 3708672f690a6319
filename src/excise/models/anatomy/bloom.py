"""BLOOM: fused ``query_key_value``, ALiBi positions, ``self_attention.dense``, ``mlp.dense_4h_to_h``.

``self_attention.dense`` takes all heads concatenated (with ``pretraining_tp > 1`` and
``slow_but_exact`` it is applied by weight slices, bypassing the module and its hooks: not
supported). The attention module adds the residual itself, so ``attn`` returns residual + output.
"""

from excise.models.anatomy.spec import AnatomySpec, register

BLOOM = register(
    AnatomySpec(
        family="bloom",
        model_types=("bloom",),
        layers="h",
        embed="word_embeddings",
        final_norm="ln_f",
        attn="self_attention",
        attn_out="self_attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
    )
)
