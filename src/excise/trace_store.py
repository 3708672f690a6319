"""Streaming activations to disk: trace a whole dataset into safetensors shards with a manifest
(:func:`trace_dataset`) and read them back (:class:`ActivationStore`). Sites and pooling are those
of :class:`excise.trace.Trace`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from excise.errors import ExciseError
from excise.io import atomic_dir, atomic_write_json, read_json
from excise.models.load import last_logits_only
from excise.trace import Pool, Trace, expand_sites, parse_site

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
    sites = expand_sites(capture, handle.anatomy.n_layers)
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

    def load(self, site: str) -> torch.Tensor:
        if site not in self.manifest["sites"]:
            raise ExciseError(f"site '{site}' was not traced; traced: {', '.join(self.sites[:6])}...")
        return torch.cat([s[site] for s in self.iter_shards([site])], 0)
