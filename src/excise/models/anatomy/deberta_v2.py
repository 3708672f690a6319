"""DeBERTa-v2/v3 encoders: BERT's layer layout with disentangled (relative-position) attention.

Checked against transformers 5 ``modeling_deberta_v2.py``: ``DebertaV2Layer`` holds
``attention.self`` (``DisentangledSelfAttention``, returns ``(context, probs)``),
``attention.output.dense`` (input: heads concatenated, ``all_head_size``), ``intermediate`` and
``output.dense`` (the down-projection, before dropout, residual and LayerNorm). Relative-position
embeddings live in ``encoder.rel_embeddings`` and are not a site.
"""

from excise.models.anatomy.spec import AnatomySpec, register

DEBERTA_V2 = register(
    AnatomySpec(
        family="deberta-v2",
        model_types=("deberta-v2",),
        layers="encoder.layer",
        embed="embeddings.word_embeddings",
        final_norm=None,
        attn="attention.self",
        attn_out="attention.output.dense",
        mlp="output",
        mlp_down="output.dense",
        is_decoder=False,
        notes="post-norm; DeBERTa-v3 checkpoints use this model type",
    )
)
