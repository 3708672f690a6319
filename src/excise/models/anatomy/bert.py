"""BERT-layout encoders: post-norm; the "MLP" is intermediate + output.

bert, roberta, xlm-roberta, camembert, and (checked against transformers 5's modeling files)
electra (when ``embedding_size != hidden_size`` the word embeddings are narrower and
``embeddings_project`` maps them up; ``embed`` still names the token table) and deberta-v2/v3
(``attention.self`` is the disentangled attention returning ``(context, probs)``; its
relative-position embeddings in ``encoder.rel_embeddings`` are not a site). ``mlp.hidden`` is the
input of ``output.dense`` (after the activation), ``mlp.out`` its output (before dropout,
residual and LayerNorm).
"""

from excise.models.anatomy.spec import AnatomySpec, register

BERT = register(
    AnatomySpec(
        family="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta-v2"),
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
