"""DistilBERT: post-norm encoder; ``attention.out_lin`` and ``ffn.lin2`` are the output projections."""

from excise.models.anatomy.spec import AnatomySpec, register

DISTILBERT = register(
    AnatomySpec(
        family="distilbert",
        model_types=("distilbert",),
        layers="transformer.layer",
        embed="embeddings.word_embeddings",
        final_norm=None,
        attn="attention",
        attn_out="attention.out_lin",
        mlp="ffn",
        mlp_down="ffn.lin2",
        is_decoder=False,
    )
)
