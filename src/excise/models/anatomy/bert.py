"""BERT-style encoders (bert, roberta, xlm-roberta): post-norm; the "MLP" is intermediate + output.

``mlp.hidden`` is the input of ``output.dense`` (after the activation), ``mlp.out`` its output
(before dropout, residual and LayerNorm).
"""

from excise.models.anatomy.spec import AnatomySpec, register

BERT = register(
    AnatomySpec(
        family="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert"),
        layers="encoder.layer",
        embed="embeddings.word_embeddings",
        final_norm=None,
        attn="attention.self",
        attn_out="attention.output.dense",
        mlp="output",
        mlp_down="output.dense",
        is_decoder=False,
    )
)
