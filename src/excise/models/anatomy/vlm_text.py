"""CLIP's text tower (``clip_text_model``): a causal-masked encoder with pre-norm blocks, reached
through ``CLIPModel.text_model`` by the root lookup. (Qwen2-VL's language models have the llama
layout: their type names are in :mod:`excise.models.anatomy.llama`.)
"""

from excise.models.anatomy.spec import AnatomySpec, register

CLIP_TEXT = register(
    AnatomySpec(
        family="clip_text",
        model_types=("clip_text_model",),
        layers="encoder.layers",
        embed="embeddings.token_embedding",
        final_norm="final_layer_norm",
        attn="self_attn",
        attn_out="self_attn.out_proj",
        mlp="mlp",
        mlp_down="mlp.fc2",
        is_decoder=False,  # no LM head: the text embedding is read at the eos position
    )
)
