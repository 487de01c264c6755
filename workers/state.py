"""Rollout state of one stream, and its safetensors + JSON form.

Everything chunk ``i`` depends on besides (spec, seed, i) lives here: the stream's cache (sink,
memory and window rows plus their frame indices) and its conditioning vector. Saving and loading
is exact, so a stream continued in a fresh process produces bit-identical chunks (on CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ops.latent_cache import LatentKVCache
from workers.durable import write_atomic
from workers.types import StreamSpec

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass
class StreamState:
    spec: StreamSpec
    config_hash: str  # ModelConfig.config_hash() of the generator that produced it
    cond: torch.Tensor  # [cond_dim] conditioning vector
    cache: LatentKVCache
    next_chunk: int = 0  # index of the chunk the next step generates
    frames_per_chunk: int = 1
    memory_query: torch.Tensor | None = None  # [E] embedding of the newest chunk: the next retrieval's query
    memory_chunks: tuple[int, ...] = ()  # chunk indices whose rows fill the memory slots now
    recent_latents: torch.Tensor | None = None  # [<=K, C, h, w] float32: the last latent frames (VAE decode resume)

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    @property
    def frames_done(self) -> int:
        return self.next_chunk * self.frames_per_chunk

    # ---- serialisation -----------------------------------------------------------------------
    def to_bytes(self) -> tuple[bytes, dict]:
        """(safetensors bytes, JSON-able meta). The meta carries the payload's sha256."""
        tensors = {"cond": self.cond.detach().cpu().contiguous(), **self.cache.state_tensors()}
        if self.memory_query is not None:
            tensors["memory_query"] = self.memory_query.detach().cpu().contiguous()
        if self.recent_latents is not None:
            tensors["recent_latents"] = self.recent_latents.detach().float().cpu().contiguous()
        payload = st_save(tensors)
        meta = {
            "format": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "config_hash": self.config_hash,
            "next_chunk": self.next_chunk,
            "frames_per_chunk": self.frames_per_chunk,
            "cache": self.cache.state_meta(),
            "memory_chunks": list(self.memory_chunks),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        return payload, meta

    @classmethod
    def from_bytes(cls, payload: bytes, meta: dict, device: torch.device | str = "cpu") -> StreamState:
        """Inverse of :meth:`to_bytes`. Raises ValueError if the payload fails its checksum."""
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported stream state format {meta.get('format')!r}")
        if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
            raise ValueError("stream state payload does not match its sha256 checksum")
        tensors = st_load(payload)
        return cls(
            spec=StreamSpec.from_dict(meta["spec"]),
            config_hash=meta["config_hash"],
            cond=tensors["cond"].to(device),
            cache=LatentKVCache.from_state(tensors, meta["cache"], device),
            next_chunk=int(meta["next_chunk"]),
            frames_per_chunk=int(meta["frames_per_chunk"]),
            memory_query=tensors.get("memory_query"),
            memory_chunks=tuple(int(c) for c in meta.get("memory_chunks", [])),
            recent_latents=tensors.get("recent_latents"),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``state.safetensors`` then ``meta.json`` into a directory, each atomically.

        The meta file is written last and holds the payload checksum, so a crash in between leaves a
        directory that :meth:`load` rejects rather than a silently mixed state.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload, meta = self.to_bytes()
        _atomic_write(d / STATE_FILE, payload)
        _atomic_write(d / META_FILE, json.dumps(meta, indent=1).encode())
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> StreamState:
        d = Path(directory)
        meta = json.loads((d / META_FILE).read_text())
        return cls.from_bytes((d / STATE_FILE).read_bytes(), meta, device)


def _atomic_write(path: Path, data: bytes) -> None:
    """Durable commit (workers.durable): the file and its directory entry are on disk when this returns."""
    write_atomic(path, data)
