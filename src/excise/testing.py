"""Tiny random-initialised models built from configs, one per supported architecture family.

Used by the test-suite and by anyone who wants a seconds-fast model to try a method on.
No download: configs are built in code and weights are random (seeded).
"""

from __future__ import annotations

from typing import Any

from excise.models.load import from_model

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
