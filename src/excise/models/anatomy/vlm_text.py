"""Text anatomies of vision-language models' text sides: CLIP's text tower and Qwen2-VL's language model.

CLIP's text tower (``clip_text_model``) is a causal-masked encoder with pre-norm blocks; reached
through ``CLIPModel.text_model`` by the root lookup. Qwen2-VL / Qwen2.5-VL language models
(``qwen2_vl_text`` / ``qwen2_5_vl_text``) have the llama module layout under their own type names.
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

QWEN2_VL_TEXT = register(
    AnatomySpec(
        family="qwen2_vl_text",
        model_types=("qwen2_vl_text", "qwen2_5_vl_text"),
        layers="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_down="mlp.down_proj",
    )
)
