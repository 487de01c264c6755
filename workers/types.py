"""Typed values that cross the generator's boundary (and, later, Ray actor boundaries)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

STREAM_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def validate_stream_id(stream_id: str) -> str:
    """Return the id if it matches ``^[a-z0-9][a-z0-9_-]{0,63}$``; raise ValueError otherwise.

    Ids become directory and table names, so nothing like ``/`` or ``..`` may pass.
    """
    if not isinstance(stream_id, str) or not STREAM_ID_RE.match(stream_id):
        raise ValueError(f"invalid stream id {stream_id!r}: must match {STREAM_ID_RE.pattern}")
    return stream_id


@dataclass(frozen=True)
class StreamSpec:
    stream_id: str  # unique name of the stream, ^[a-z0-9][a-z0-9_-]{0,63}$
    seed: int = 0  # noise of chunk i depends only on (seed, i)
    prompt: str = ""  # hashed into the per-stream conditioning vector (stand-in for a text encoder)
    trajectory: str = ""  # camera path: "" (no camera), "still", "revisit" or "file" (then ``actions``)
    actions: tuple[tuple[int, int], ...] = ()  # trajectory "file": per-frame (dy, dx) in patches
    world: int | None = None  # procedural world seed: chunk 0 is its true view (the prompt frames)

    def __post_init__(self) -> None:
        validate_stream_id(self.stream_id)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"{self.seed=} must be an integer in [0, 2**63)")
        object.__setattr__(self, "actions", tuple(tuple(int(v) for v in a) for a in self.actions))
        if self.world is not None and (not isinstance(self.world, int) or not 0 <= self.world < 2**63):
            raise ValueError(f"{self.world=} must be an integer in [0, 2**63)")
        if self.world is not None and not self.trajectory:
            raise ValueError("a world prompt needs a camera trajectory (e.g. trajectory='still')")
        if self.trajectory:
            from workers.world.trajectory import trajectory_of

            trajectory_of(self)  # validates name and actions

    def to_dict(self) -> dict:
        d = {"stream_id": self.stream_id, "seed": self.seed, "prompt": self.prompt}
        if self.trajectory:
            d.update(trajectory=self.trajectory, world=self.world)
            if self.actions:
                d["actions"] = [list(a) for a in self.actions]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StreamSpec:
        return cls(
            d["stream_id"], int(d.get("seed", 0)), str(d.get("prompt", "")), str(d.get("trajectory", "")),
            tuple(tuple(a) for a in d.get("actions", ())), d.get("world"),
        )  # fmt: skip


@dataclass
class Chunk:
    """One generated chunk of one stream."""

    stream_id: str
    chunk_index: int  # i: the i-th chunk of the stream
    first_frame: int  # absolute latent frame index of its first frame
    latents: torch.Tensor  # [F, C, H, W] clean latents (fp32, CPU)
    frames: torch.Tensor  # [F * t_stride, H_px, W_px, 3] uint8 decoded video frames; empty: no decoder (latents only)
    embedding: np.ndarray | None = None  # float32 [E] retrieval embedding (when the generator has an embedder)
    memory_chunks: tuple[int, ...] = ()  # chunk indices that sat in the memory slots while it was generated

    @property
    def num_frames(self) -> int:
        """Decoded frames, or latent frames (``latents.shape[0]``) for a latent-only chunk."""
        if self.frames.numel() == 0 and self.latents.ndim == 4:
            return int(self.latents.shape[0])
        return int(self.frames.shape[0])
