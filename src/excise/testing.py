"""Tiny random-initialised models built from configs, one per supported architecture family.

Used by the test-suite and by anyone who wants a seconds-fast model to try a method on.
No download: configs are built in code and weights are random (seeded).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from excise.errors import ExciseError
from excise.models.load import from_model, load
from excise.models.processors import image_only_processor

TINY: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=24, vocab_size=256, max_position_embeddings=128),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, vocab_size=256, max_position_embeddings=128),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=256, max_position_embeddings=128),
    "roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=256, max_position_embeddings=130, pad_token_id=1),
    "xlm-roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, max_position_embeddings=130, pad_token_id=1),
    # DeBERTa-v3 layout: relative (disentangled) attention with log buckets, no absolute positions
    "deberta-v2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=256, max_position_embeddings=128, relative_attention=True,
                       pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
                       norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                       type_vocab_size=0),
    # ELECTRA-small layout: word embeddings narrower than the hidden size (embeddings_project)
    "electra": dict(embedding_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=256, max_position_embeddings=128),
    # ModernBERT: 3 layers so both global (0) and sliding-window (1, 2) attention layers exist
    "modernbert": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       vocab_size=256, max_position_embeddings=128, local_attention=16,
                       global_attn_every_n_layers=3, cls_token_id=1, sep_token_id=2),
}
# Other registered llama-layout types; tiny configs exist but they are kept out of DECODERS so the
# suite's per-family parametrisations stay fast (tests/test_anatomy.py covers them).
for _mt, _extra in (("qwen3", {"head_dim": 24}), ("olmo", {}), ("olmo2", {}), ("smollm3", {})):
    TINY[_mt] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, **_extra)
EXTRA_DECODERS = ("qwen3", "olmo", "olmo2", "smollm3")
DECODERS = ("llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox")
# More decoder families with tiny configs, each covered by its own tests/test_anatomy_more_*.py
# (kept out of DECODERS so the per-family parametrisations elsewhere stay fast); appended to below.
MORE_DECODERS: tuple[str, ...] = ()
ENCODERS = ("bert", "roberta", "xlm-roberta", "deberta-v2", "electra", "modernbert")


def _is_encoder(model_type: str) -> bool:
    return model_type in ENCODERS or model_type in MORE_ENCODERS  # MORE_ENCODERS: end of module


def tiny_config(model_type: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    kw = dict(TINY[model_type])
    kw.update(overrides)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kw.setdefault(k, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[k])
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, *, seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    """A tiny random model of the family (causal LM for decoders, base encoder otherwise), eval mode."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    cls = AutoModel if _is_encoder(model_type) else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def matrix_cases() -> list[tuple[str, str, dict]]:
    """(id, model type, config overrides) of every family the matrix in docs/core.md covers."""
    falcon = [("falcon-new_arch", "falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
              ("falcon-alibi-seq", "falcon", dict(alibi=True, multi_query=False, parallel_attn=False))]
    fams = DECODERS + EXTRA_DECODERS + MORE_DECODERS + ENCODERS + ("distilbert",) + MOE_DECODERS
    return [(f, f, {}) for f in fams] + falcon + [(f, f, {}) for f in INFERRED_DECODERS + INFERRED_ENCODERS]


def tiny_handle(model_type: str, *, seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    """A ModelHandle around a tiny model, with a byte-level stand-in tokenizer (no download)."""
    model = tiny_model(model_type, seed=seed, attn_implementation=attn_implementation, **overrides)
    kind = "encoder" if _is_encoder(model_type) else "causal-lm"
    return from_model(model, ByteTokenizer(model.config.vocab_size), name=f"tiny-{model_type}", kind=kind)


class ByteTokenizer:
    """A minimal tokenizer: UTF-8 bytes folded into the vocabulary (ids 3..V-1), pad 0, bos 1, eos 2.

    Enough for the API used by excise (``__call__`` with padding, ``decode``, chat fallback).
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    pad_token, bos_token, eos_token = "<pad>", "<s>", "</s>"
    chat_template = None
    padding_side = "right"

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [3 + (b % (self.vocab_size - 3)) for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out = bytes(i - 3 for i in ids if i >= 3 and i - 3 < 256)
        return out.decode("utf-8", errors="replace")

    def __call__(self, texts: Any, text_pair: Any = None, return_tensors: str = "pt", padding: bool = True,
                 padding_side: str | None = None, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True, **_: Any):
        """``text_pair``: a second text per item, appended after an eos separator (``<s> a </s> b``)."""
        import torch
        from transformers import BatchEncoding

        single = isinstance(texts, str)
        seqs = [self.encode(t, add_special_tokens) for t in ([texts] if single else texts)]
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            seqs = [s + [self.eos_token_id] + self.encode(b) for s, b in zip(seqs, pairs)]
        if truncation and max_length:
            seqs = [s[:max_length] for s in seqs]
        T = max(len(s) for s in seqs)
        side = padding_side or self.padding_side
        ids, mask = [], []
        for s in seqs:
            pad = [self.pad_token_id] * (T - len(s))
            ids.append(s + pad if side == "right" else pad + s)
            mask.append([1] * len(s) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(s))
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})


def tiny_tokenizer() -> Any:
    """A real ``transformers`` fast tokenizer (byte-level, no merges: one token per byte) built offline.

    259 ids: <pad> 0, <s> 1, </s> 2, then the 256 byte symbols. Saved with ``save_pretrained`` it
    makes a tiny model directory loadable by path like any hub model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny(model_type: str, path: Any, *, seed: int = 0, **overrides: Any) -> Any:
    """Write a tiny random model of the family plus a real tokenizer to ``path`` (a Hugging Face model dir)."""
    from pathlib import Path

    tok = tiny_tokenizer()
    overrides.setdefault("vocab_size", len(tok))
    model = tiny_model(model_type, seed=seed, **overrides)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# gemma3_text, granite, starcoder2, cohere, stablelm, phi (tests/test_anatomy_more_a.py)
_MORE_A_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=256, max_position_embeddings=128)
TINY["gemma3_text"] = dict(_MORE_A_BASE, num_key_value_heads=2, head_dim=24, sliding_window=64,
                           layer_types=["sliding_attention", "full_attention"])
TINY["granite"] = dict(_MORE_A_BASE, num_key_value_heads=2, embedding_multiplier=2.0, residual_multiplier=0.5,
                       attention_multiplier=0.2, logits_scaling=2.0)
TINY["starcoder2"] = dict(_MORE_A_BASE, num_key_value_heads=2)
TINY["cohere"] = dict(_MORE_A_BASE, num_key_value_heads=2)
TINY["stablelm"] = dict(_MORE_A_BASE, num_key_value_heads=2)
TINY["phi"] = dict(_MORE_A_BASE)
MORE_DECODERS += ("gemma3_text", "granite", "starcoder2", "cohere", "stablelm", "phi")

# falcon, gptj, bloom (decoders) and distilbert (encoder) (tests/test_anatomy_more_b.py)
TINY["falcon"] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
TINY["gptj"] = dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=256, n_positions=128,
                    bos_token_id=1, eos_token_id=2)
TINY["bloom"] = dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=1, eos_token_id=2)
# distilbert: the config's attribute_map takes the common names; hidden_dim is its d_mlp (4 * 64)
TINY["distilbert"] = dict(hidden_size=64, hidden_dim=256, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=256, max_position_embeddings=128)
MORE_DECODERS += ("falcon", "gptj", "bloom")
# not in ENCODERS: peft has no default LoRA targets for distilbert (q_lin/v_lin), which the
# encoder fairness-finetuning tests rely on
MORE_ENCODERS: tuple[str, ...] = ("distilbert",)


# mixture-of-experts decoders (tests/test_anatomy_moe.py): 4 experts, top-2, expert width 32.
# qwen2_moe keeps layer 1 dense (mlp_only_layers) so a mixed model is covered; it has a shared expert.
_MOE_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 max_position_embeddings=128, num_experts_per_tok=2)
TINY["mixtral"] = dict(_MOE_BASE, num_local_experts=4, intermediate_size=32)
TINY["qwen2_moe"] = dict(_MOE_BASE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                         intermediate_size=96, mlp_only_layers=[1])
TINY["qwen3_moe"] = dict(_MOE_BASE, num_experts=4, moe_intermediate_size=32, intermediate_size=96, head_dim=24)
TINY["olmoe"] = dict(_MOE_BASE, num_experts=4, intermediate_size=32)
TINY["granitemoe"] = dict(_MOE_BASE, num_local_experts=4, intermediate_size=32, embedding_multiplier=2.0,
                          residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0)
MOE_DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe")

# families with no spec: excise infers and proves their anatomy (tests/test_anatomy_matrix.py)
_L = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
          max_position_embeddings=128)
TINY.update({"biogpt": _L, "persimmon": _L, "roformer": _L, "megatron-bert": _L, "data2vec-text": dict(_L, pad_token_id=1,
             max_position_embeddings=130), "olmo3": dict(_L, num_key_value_heads=2), "helium": dict(_L, num_key_value_heads=2, head_dim=16),
             "xglm": dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, vocab_size=256, max_position_embeddings=128),
             "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=256, n_positions=128),
             "granitemoeshared": dict(_L, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=32, shared_intermediate_size=48),
             "flex_olmo": dict(_L, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, intermediate_size=32)})
# not mpt: its ALiBi escapes lm_packed.packed_ok (build_mpt_alibi_tensor), so packed log-likelihood differs
INFERRED_DECODERS = ("biogpt", "persimmon", "olmo3", "helium", "xglm", "gpt_bigcode", "flex_olmo", "granitemoeshared")
INFERRED_ENCODERS = ("roformer", "megatron-bert", "data2vec-text")
MORE_ENCODERS += INFERRED_ENCODERS  # built with AutoModel (an encoder), like distilbert


# --- tiny vision-language models (tests/test_vlm_anatomy.py) ----------------------------------
# 32x32 px images, 8 px patches: 16 patches per image. Each family's processor (not excise) expands
# the image placeholder into image tokens, so the conventions are the family's own.
VLM_FAMILIES = ("llava", "clip", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")
CAPTION_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")  # generate text from an image
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = {"llava": "<image>", "clip": "", "qwen2_vl": _QWEN_IMAGE, "qwen2_5_vl": _QWEN_IMAGE,
                     "idefics3": "<image>", "smolvlm": "<image>"}
_VLM_WORDS = ("a the an photo picture image of man woman person people doctor nurse engineer teacher is are was "
              "in on at with and who what describe caption he she his her they their it this that").split()
_IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
_QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_VLM_SPECIALS = {"llava": ["<image>"], "clip": [], "qwen2_vl": _QWEN_TOKENS, "qwen2_5_vl": _QWEN_TOKENS,
                 "idefics3": _IDEFICS_TOKENS, "smolvlm": _IDEFICS_TOKENS + ["<video>"]}
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)


def tiny_word_tokenizer(specials: Any = (), *, add_eos: bool = False) -> Any:
    """A word-level fast tokenizer over a small captioning vocabulary, plus the family's special tokens.

    <pad> 0, <s> 1, <unk> 2, </s> 3 (eos is not 2: CLIP reads id 2 as the legacy "argmax" eos).
    Prepends <s>; ``add_eos`` also appends </s> (CLIP's text tower pools at the eos).
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "<unk>", "</s>", *_VLM_WORDS])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tmpl = "<s> $A </s>" if add_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=tmpl, special_tokens=[("<s>", 1), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if specials:
        fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def tiny_vlm_parts(family: str, *, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of a tiny random VLM of the family, built from configs (no download)."""
    import torch
    import transformers as tf


    if family not in VLM_FAMILIES:
        raise ExciseError(f"no tiny VLM for family '{family}'; choose one of {', '.join(VLM_FAMILIES)}")
    if family == "smolvlm" and importlib.util.find_spec("num2words") is None:
        raise ExciseError("the SmolVLM processor needs the num2words package: pip install num2words")
    tok = tiny_word_tokenizer(_VLM_SPECIALS[family], add_eos=family == "clip")
    ids = {t: tok.convert_tokens_to_ids(t) for t in _VLM_SPECIALS[family]}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=3)
    torch.manual_seed(seed)
    if family == "llava":
        ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        # num_additional_image_tokens=1: CLIP's CLS; "default" drops it, leaving one token per patch
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, image_token="<image>",
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
        # vision_feature_layer=-1: the last vision block feeds the projector (-2 would leave it without gradient)
        cfg = tf.LlavaConfig(vision_config=dict(_VISION, model_type="clip_vision_model"),
                             text_config=dict(text, model_type="llama"), image_token_id=ids["<image>"],
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
        model = tf.LlavaForConditionalGeneration(cfg)
    elif family == "clip":
        ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = tf.CLIPProcessor(image_processor=ip, tokenizer=tok)
        cfg = tf.CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=64,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=3),
                            vision_config=_VISION, projection_dim=16)
        model = tf.CLIPModel(cfg)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        # 32x32 px -> a 4x4 grid of 8 px patches -> 2x2 merged image tokens
        ip = tf.Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                                      temporal_patch_size=2)
        v2 = family == "qwen2_vl"
        proc = image_only_processor(tf.Qwen2VLProcessor if v2 else tf.Qwen2_5_VLProcessor)(image_processor=ip,
                                                                                          tokenizer=tok)
        vision = dict(depth=2, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        # qwen2.5: 16 px windows (4 patches) in block 0, full attention in block 1
        vision.update(dict(embed_dim=32, hidden_size=64, mlp_ratio=2) if v2 else
                      dict(hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=16,
                           fullatt_block_indexes=[1]))
        cfg = (tf.Qwen2VLConfig if v2 else tf.Qwen2_5_VLConfig)(
            vision_config=vision, text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        model = (tf.Qwen2VLForConditionalGeneration if v2 else tf.Qwen2_5_VLForConditionalGeneration)(cfg)
    else:  # idefics3, smolvlm: 16 patches, pixel-shuffled by 2 -> 4 image tokens; no image splitting
        is_smol = family == "smolvlm"
        ip_cls = tf.SmolVLMImageProcessor if is_smol else tf.Idefics3ImageProcessor
        ip = ip_cls(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
        proc_cls = image_only_processor(tf.SmolVLMProcessor) if is_smol else tf.Idefics3Processor
        proc = proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=4)
        cfg_cls = tf.SmolVLMConfig if is_smol else tf.Idefics3Config
        cfg = cfg_cls(vision_config=_VISION, text_config=dict(text, model_type="llama"), scale_factor=2,
                      image_token_id=ids["<image>"])
        model = (tf.SmolVLMForConditionalGeneration if is_smol else tf.Idefics3ForConditionalGeneration)(cfg)
    return model.eval(), proc


def tiny_vlm(family: str, tmp_dir: Any = None, *, seed: int = 0) -> Any:
    """A ModelHandle around a tiny random VLM with its family's processor.

    With ``tmp_dir`` the model and processor are saved there and loaded back with
    ``excise.models.load(tmp_dir, kind="vlm")`` (the path a real checkpoint takes).
    """
    from pathlib import Path


    model, proc = tiny_vlm_parts(family, seed=seed)
    if tmp_dir is None:
        return from_model(model, processor=proc, name=f"tiny-{family}", kind="vlm")
    path = Path(tmp_dir)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return load(str(path), kind="vlm")


def caption_chat_template(family: str) -> str:
    """A minimal chat template placing the family's image placeholder before the text.

    The tiny processors have none and their tokenizers no ``<en>`` / ``<ar>`` tag, so
    :func:`excise.tasks.caption_prompts.caption_prompt` needs one to build a captioning prompt."""
    return ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + IMAGE_PLACEHOLDER[family] + "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} caption{% endif %}")


def tiny_captioner(family: str, tmp_dir: Any = None, *, seed: int = 0) -> Any:
    """:func:`tiny_vlm` of a captioning family whose processor carries :func:`caption_chat_template`."""
    if family not in CAPTION_FAMILIES:
        raise ExciseError(f"'{family}' writes no caption; choose one of {', '.join(CAPTION_FAMILIES)}")
    h = tiny_vlm(family, tmp_dir, seed=seed)
    h.processor.chat_template = caption_chat_template(family)
    return h


def tiny_image(seed: int = 0, size: int = 32) -> Any:
    """A random RGB PIL image (seeded)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def vlm_inputs(handle: Any, images: Any, texts: Any = "describe the photo") -> Any:
    """Processor inputs for a tiny VLM: each image with its text (the family's image placeholder prepended).

    CLIP pairs images and texts without a placeholder. Idefics3 / SmolVLM take one list of images per text.
    """
    family = handle.vision.spec.family
    family = "smolvlm" if getattr(handle.model.config, "model_type", "") == "smolvlm" else family
    texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
    if family == "clip":
        return handle.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    prompts = [f"{IMAGE_PLACEHOLDER[family]} {t}" for t in texts]
    imgs = [[im] for im in images] if family in ("idefics3", "smolvlm") else list(images)
    return handle.processor(images=imgs, text=prompts, return_tensors="pt", padding=True)
