"""ModernBERT encoders: pre-norm, rotary, fused ``Wqkv``, GLU MLP, alternating local/global attention.

Checked against transformers 5 ``modeling_modernbert.py``: ``ModernBertModel.layers[l]`` has
``attn`` (``ModernBertAttention``: ``Wqkv`` fused, returns ``(output, weights)``), ``attn.Wo``
(input: heads concatenated), ``mlp`` (``Wi`` projects to ``2 * intermediate_size``, split into
input and gate; ``Wo`` is the down-projection with ``intermediate_size`` inputs) and a
``final_norm`` after the last layer. ``mlp.L.hidden`` is therefore act(input) * gate, the GLU
product, as for llama's ``down_proj``.
"""

from excise.models.anatomy.spec import AnatomySpec, register

MODERNBERT = register(
    AnatomySpec(
        family="modernbert",
        model_types=("modernbert",),
        layers="layers",
        embed="embeddings.tok_embeddings",
        final_norm="final_norm",
        attn="attn",
        attn_out="attn.Wo",
        mlp="mlp",
        mlp_down="mlp.Wo",
        is_decoder=False,
        notes="pre-norm; layer 0 has no attention norm (Identity)",
    )
)
