"""Falcon: fused ``query_key_value``, output projection ``dense``, MLP ``dense_4h_to_h``.

Covers the original parallel-attention layout (one LayerNorm feeding attention and MLP,
multi-query keys/values) and ``new_decoder_architecture`` (two LayerNorms, grouped keys/values);
either way ``dense`` takes all query heads concatenated. The block adds the attention output into
the MLP output in place (``mlp_output += attention_output``), so Trace copies an ``mlp.L.out``
capture with ``pool="all"`` (``mlp_out_added_in_place``); pooled captures are copies already.
"""

from excise.models.anatomy.spec import AnatomySpec, register

FALCON = register(
    AnatomySpec(
        family="falcon",
        model_types=("falcon",),
        layers="h",
        embed="word_embeddings",
        final_norm="ln_f",
        attn="self_attention",
        attn_out="self_attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        mlp_out_added_in_place=True,
    )
)
