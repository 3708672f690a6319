"""ELECTRA encoders (the discriminator as a sentence encoder): BERT's layout.

Checked against transformers 5 ``modeling_electra.py``: ``ElectraLayer`` has ``attention.self``,
``attention.output.dense`` (heads concatenated in), ``intermediate`` and ``output.dense``. When
``embedding_size != hidden_size`` the word embeddings are narrower and ``embeddings_project``
maps them up; ``embed`` still names the token embedding table.
"""

from excise.models.anatomy.spec import AnatomySpec, register

ELECTRA = register(
    AnatomySpec(
        family="electra",
        model_types=("electra",),
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
