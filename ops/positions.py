"""Position policies: absolute latent frame index -> temporal id fed to the 3-D RoPE.

Every cached frame keeps its absolute index; the temporal id is derived at read time, so a policy
whose ids shift as the stream advances (``relative``) needs no rewrite of the cache.

- ``absolute``: id = absolute frame index. Grows without bound (fine for RoPE computed on the fly,
  but outside the range the model was trained on once a rollout passes its training length).
- ``relative``: Echo-Infinity's unified relative RoPE. The newest frame gets
  ``min(newest, max_temporal_id)`` and every local frame keeps its distance to the newest, so ids
  never exceed the trained maximum however long the stream runs. Sink frames keep ids 0..n_sink-1.

In both policies retrieved memory frames sit at the sink's temporal position (id 0), as in
LongLive-RAG: they act as extra, content-addressed sink frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PolicyName = Literal["absolute", "relative"]
SlotKind = Literal["sink", "memory", "local"]


@dataclass(frozen=True)
class PositionPolicy:
    kind: PolicyName = "relative"  # which mapping to use (see module docstring)
    max_temporal_id: int = 20  # relative only: the newest frame's id never exceeds this

    def __post_init__(self) -> None:
        if self.kind not in ("absolute", "relative"):
            raise ValueError(f"{self.kind=} must be 'absolute' or 'relative'")
        if self.max_temporal_id < 1:
            raise ValueError(f"{self.max_temporal_id=} must be >= 1")

    def temporal_ids(self, frames: torch.Tensor, slot: SlotKind, newest: int) -> torch.Tensor:
        """Map absolute frame indices to temporal ids.

        Args:
            frames: [N] int64 absolute latent frame indices.
            slot: where the frames live: the sink, the retrieved memory, or the local window/current chunk.
            newest: absolute index of the newest frame in the attention context (last frame of the
                chunk being generated).
        Returns:
            [N] int64 temporal ids.
        """
        frames = frames.to(torch.int64)
        if slot == "memory":
            return torch.zeros_like(frames)
        if slot == "sink" or self.kind == "absolute":
            return frames.clone()
        newest_id = min(newest, self.max_temporal_id)
        return frames - (newest - newest_id)
