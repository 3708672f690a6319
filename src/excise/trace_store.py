"""Streaming activations to disk: trace a whole dataset into safetensors shards with a manifest
(:func:`trace_dataset` for texts, :func:`trace_images` for a vision-language model's (prompt,
image) pairs) and read them back (:class:`ActivationStore`). Sites and pooling are those of
:class:`excise.trace.Trace`, plus ``image`` pooling (the mean over image positions) for VLMs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import json
import shutil
import time
from contextlib import ExitStack

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from excise.errors import ExciseError
from excise.io import atomic_dir, atomic_write_json, read_json
from excise.models.load import last_logits_only
from excise.trace import Pool, Trace, expand_sites, is_vision_site, parse_site

IMAGE_POOLS = ("image", "mean", "last", "cls", "all")

@dataclass
class ShardWriter:
    """Accumulates pooled captures and flushes a safetensors shard every ``shard_size`` samples."""

    out_dir: Path
    shard_size: int
    buffers: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    n_buffered: int = 0
    shards: list[dict] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def add(self, cache: dict[str, torch.Tensor], n: int) -> None:
        for k, v in cache.items():
            self.buffers[k].append(v.detach().to("cpu").contiguous())
        self.n_buffered += n
        if self.n_buffered >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.n_buffered:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {k: torch.cat(v, 0) for k, v in self.buffers.items()}
        for k, v in tensors.items():
            self.shapes[k] = list(v.shape[1:])
        tmp = self.out_dir / f".{name}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out_dir / name)
        self.shards.append({"file": name, "n": self.n_buffered})
        self.buffers = defaultdict(list)
        self.n_buffered = 0


def trace_dataset(
    handle: Any,
    texts: Iterable[str],
    capture: str | Iterable[str],
    out_dir: str | Path,
    *,
    pool: Pool = "last",
    batch_size: int = 8,
    shard_size: int = 256,
    max_length: int | None = 512,
    progress: bool = True,
) -> "ActivationStore":
    """Trace a whole dataset and stream pooled captures to disk in shards with a manifest.

    Peak memory is bounded by one shard (``shard_size`` samples), so 10x more samples does not
    raise it. ``pool`` must be ``last`` or ``mean`` (variable-length ``all`` does not shard well).
    Writes into a temporary directory that is moved into place only when complete.
    """
    if pool == "all":
        raise ExciseError("trace_dataset streams pooled activations: use pool='last' or 'mean'")
    out_dir = Path(out_dir)
    texts = list(texts) if not isinstance(texts, list) else texts
    if not texts:
        raise ExciseError("trace_dataset: no texts to trace")
    an = handle.anatomy
    sites = expand_sites(capture, an.n_layers, moe_layers=an.moe_layers, n_experts=an.n_experts)
    if any(parse_site(x).kind == "attn.pattern" for x in sites):
        raise ExciseError(
            "attn.L.pattern has a key axis as long as each batch, so it does not shard: "
            "capture it with Trace(pool='all') per batch"
        )
    # only the hooks' captures are needed: skip the LM head over every position (for SmolLM2 at
    # batch 8 x 128 tokens that is a 200 MB logits tensor and ~20% of the forward FLOPs)
    fwd_kw = last_logits_only(handle.model)
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, shard_size)
        starts = range(0, len(texts), batch_size)
        it = tqdm(starts, desc="trace", unit="batch", disable=not progress)
        with torch.inference_mode(), Trace(handle, sites, pool=pool) as tr:
            for i in it:
                chunk = texts[i:i + batch_size]
                batch = handle.encode(chunk, max_length=max_length)
                handle.model(**batch, **fwd_kw)
                writer.add(tr.cache, len(chunk))
                tr.cache.clear()
        writer.flush()
        manifest = {
            "format": "excise.activations/1",
            "model": handle.name,
            "sites": sites,
            "pool": pool,
            "n_samples": len(texts),
            "shapes": writer.shapes,
            "shards": writer.shards,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return ActivationStore(out_dir)


class ActivationStore:
    """Read activations written by :func:`trace_dataset`: per shard, or one site concatenated."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise ExciseError(f"not an activation store (no manifest.json): {self.path}")
        self.manifest = read_json(mf)
        for key in ("sites", "shards", "n_samples"):
            if key not in self.manifest:
                raise ExciseError(f"corrupt manifest: missing field '{key}'", where=str(mf))

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def __len__(self) -> int:
        return int(self.manifest["n_samples"])

    def iter_shards(self, sites: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        for shard in self.manifest["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                keys = sites or list(f.keys())
                yield {k: f.get_tensor(k) for k in keys}

    def samples(self) -> list[dict]:
        """The per-sample records written beside the shards (empty if none were given)."""
        name = self.manifest.get("samples")
        if not name:
            return []
        with open(self.path / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def load(self, site: str) -> torch.Tensor:
        if site not in self.manifest["sites"]:
            raise ExciseError(f"site '{site}' was not traced; traced: {', '.join(self.sites[:6])}...")
        return torch.cat([s[site] for s in self.iter_shards([site])], 0)


def _pool_vlm(x: torch.Tensor, pool: str, image_mask: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Pool one language-model capture [B, T, ...] by its token masks (vision sites pool in the Trace)."""
    if pool == "all":
        return x
    if pool == "cls":
        return x[:, 0]
    if pool == "last":
        last = (attn_mask.shape[1] - 1) - attn_mask.flip(-1).long().argmax(-1)
        return x[torch.arange(x.shape[0]), last.to(x.device)]
    m = (image_mask if pool == "image" else attn_mask).to(x.dtype).to(x.device)
    m = m.view(*m.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def _as_list(image: Any) -> list:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _per_image(x: torch.Tensor, n: int) -> torch.Tensor:
    """A flat (Qwen2-VL) ``all`` capture [n * P, d] as [n, P, d]: every image has P rows at equal sizes."""
    if x.shape[0] == n:
        return x
    if x.shape[0] % n:
        raise ExciseError(f"pool='all' at a flat vision site needs equal-sized images ({x.shape[0]} rows for {n} images)")
    return x.view(n, x.shape[0] // n, *x.shape[1:])


def is_contrastive(handle: Any) -> bool:
    """A contrastive image-text model (CLIP): its projector pools one embedding per image, and images
    never enter a language model, so nothing is generated from them."""
    try:
        spec = handle.vision.spec
    except (ExciseError, AttributeError):
        return False
    return bool(spec.pooled_projector) or not callable(getattr(handle.model, "generate", None))


def trace_images(handle: Any, prompts: Sequence[str] | None, images: Sequence[Any], capture: str | Iterable[str],
                 out_dir: str | Path, *, pool: str | dict[str, str] = "image", batch_size: int = 32,
                 shard_size: int = 512, samples: Sequence[dict] | None = None, progress: bool = True) -> "ActivationStore":
    """Trace a VLM over (prompt, image) pairs and stream pooled captures to shards with a manifest.

    ``capture``: language-model sites (``resid.L`` ...) and vision sites (``vision.L``,
    ``projector.out``). ``pool``: one of ``image`` (mean over the image-token positions of the
    language model, over patches for vision sites), ``mean`` (all real tokens), ``last``, ``cls``
    (position 0), ``all`` (every position; equal lengths only), or a dict site -> pool.
    A contrastive model (CLIP, :func:`is_contrastive`) runs its image tower alone: vision sites only,
    ``prompts`` ignored (None allowed); ``projector.out`` is then one embedding per image.
    ``samples``: one JSON-able record per pair (id, image path, captions, labels), written to
    ``samples.jsonl`` beside the manifest. Resumable: shards land in ``<out>.partial/`` as they
    are written, a re-run with the same settings continues after the last complete shard, and
    the folder becomes ``<out>`` only when complete.
    """
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists():
        return ActivationStore(out_dir)
    contrastive = is_contrastive(handle)
    if prompts is None and contrastive:
        prompts = [""] * len(images)
    if prompts is None or len(prompts) != len(images) or not images:
        raise ExciseError(f"trace_images needs as many prompts as images (got {len(prompts or [])} and "
                          f"{len(images)}), at least one")
    if samples is not None and len(samples) != len(images):
        raise ExciseError(f"{len(samples)} sample records for {len(images)} images")
    processor = getattr(handle, "processor", None)
    if processor is None:
        raise ExciseError("trace_images needs a vision-language model handle with a processor")
    n_layers = handle.anatomy.n_layers if handle.anatomy is not None else 0
    sites = [s for p in ([capture] if isinstance(capture, str) else capture) for s in str(p).split(",") if s.strip()]
    sites = expand_vlm_sites(handle, sites)
    pools = {s: (pool.get(s, pool.get("*", "image")) if isinstance(pool, dict) else pool) for s in sites}
    bad = sorted({p for p in pools.values() if p not in IMAGE_POOLS})
    if bad:
        raise ExciseError(f"unknown pooling '{bad[0]}'; choose one of {', '.join(IMAGE_POOLS)}")
    lm_sites = [s for s in sites if not is_vision_site(s)]
    if contrastive and lm_sites:
        raise ExciseError(f"site '{lm_sites[0]}': images do not pass a contrastive model's text tower; "
                          "trace vision.L and projector.out")
    # vision sites pool inside the Trace (it knows each image's patches, flat layouts included);
    # language-model sites are captured whole and pooled here by the image-token mask
    groups: dict[str, list[str]] = {}
    for s in sites:
        key = "lm" if s in lm_sites else {"image": "mean"}.get(pools[s], pools[s])
        groups.setdefault(key, []).append(s)
    image_id = getattr(handle.model.config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(handle.model.config, "image_token_index", None)
    settings = {"model": handle.name, "sites": sites, "pools": pools, "n_samples": len(images), "n_layers": n_layers}
    part = out_dir.with_name(out_dir.name + ".partial")
    state_path = part / "progress.json"
    done = 0
    if state_path.exists():
        state = read_json(state_path)
        if state.get("settings") == settings:
            done = int(state["done"])
            shards = state["shards"]
            shapes = state["shapes"]
        else:
            shutil.rmtree(part)
    if done == 0:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        shards, shapes = [], {}
    writer = ShardWriter(part, shard_size, shards=list(shards), shapes=dict(shapes))
    model = handle.model
    bar = tqdm(total=len(images), initial=done, desc="extract", unit="img", disable=not progress)
    t0 = time.time()
    with torch.inference_mode(), ExitStack() as stack:
        traces = {k: stack.enter_context(Trace(handle, v, pool="all" if k == "lm" else k)) for k, v in groups.items()}
        for i in range(done, len(images), batch_size):
            chunk = slice(i, min(i + batch_size, len(images)))
            n = chunk.stop - chunk.start
            if contrastive:  # CLIP: the image tower and its projection only
                px = processor(images=list(images[chunk]), return_tensors="pt")["pixel_values"]
                model.get_image_features(pixel_values=px.to(handle.device))
            else:
                # one image list per prompt: SmolVLM's processor refuses a flat list, every family takes this
                enc = processor(text=list(prompts[chunk]), images=[_as_list(im) for im in images[chunk]],
                                return_tensors="pt", padding=True).to(handle.device)
                model(**enc)
                ids, amask = enc["input_ids"], enc["attention_mask"]
                imask = ids == image_id if image_id is not None else amask.bool()
            out = {}
            for k, tr in traces.items():
                for s in groups[k]:
                    x = tr.cache[s]
                    if k == "lm":
                        x = _pool_vlm(x, pools[s], imask, amask)
                    elif k == "all":
                        x = _per_image(x, n)
                    out[s] = x.float()
                tr.cache.clear()
            writer.add(out, n)
            bar.update(n)
            if writer.n_buffered == 0:  # a shard was just written: record progress for a resume
                atomic_write_json(state_path, {"settings": settings, "done": chunk.stop, "shards": writer.shards,
                                               "shapes": writer.shapes})
    writer.flush()
    bar.close()
    if samples is not None:
        with open(part / "samples.jsonl", "w", encoding="utf-8") as f:
            for rec in samples:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write_json(part / "manifest.json", {
        "format": "excise.activations/1", "model": handle.name, "sites": sites, "pools": pools,
        "n_samples": len(prompts), "shapes": writer.shapes, "shards": writer.shards, "dtype": "float32",
        "prompts": sorted(set(prompts)), "samples": "samples.jsonl" if samples is not None else None,
        "seconds": round(time.time() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    state_path.unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    part.replace(out_dir)
    return ActivationStore(out_dir)


def expand_vlm_sites(handle: Any, sites: Sequence[str]) -> list[str]:
    """:func:`excise.trace.expand_sites` with a VLM's two layer counts: the language model's for text
    sites (``resid.*``), the vision tower's for ``vision.*``."""
    sites = [s.strip() for s in sites]
    an = handle.anatomy
    text = [s for s in sites if not is_vision_site(s)]
    if an is None and text:
        raise ExciseError(f"site '{text[0]}': this model has no language-model anatomy")
    n_vision = handle.vision.n_layers if len(text) < len(sites) else None
    if an is None:
        return expand_sites(sites, 0, n_vision)
    return expand_sites(sites, an.n_layers, n_vision, moe_layers=an.moe_layers, n_experts=an.n_experts)
