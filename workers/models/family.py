"""The one seam between the rollout core (workers/generator.py) and a model family.

The generator owns everything that is the same for every model: per-stream caches (sink, memory,
window), positions, retrieval, the sampler, checkpoints. A family owns what a model is: its
modules and weights, how a stream's conditioning is made, and one chunk forward over
``[sink | memory | window | chunk]`` that reads and (on the re-cache pass) writes the cache rows.

Families: ``tiny`` (the small DiT / world model, workers/models/tiny) and ``wan`` (Wan2.1 on
diffusers modules, workers/models/wan). Adding one touches this file's ``build_family`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.models.source import ModelSource
from workers.types import StreamSpec


class ModelFamily(Protocol):
    cfg: ModelConfig
    weights_sha: str | None  # digest of the loaded weights (None: the seeded random init)
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # RoPE layout of its keys

    def conditioning(self, spec: StreamSpec) -> torch.Tensor:
        """The stream's conditioning tensor (kept in its state and checkpoint)."""
        ...

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        states: Sequence,
        actions: torch.Tensor,
        ctxs: list[StreamContext],
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """Velocity [B, F, C, H, W] of a chunk x [B, F, C, H, W] at noise levels sigma [B].

        ``states`` give each row's conditioning (``state.cond``) and stream id; ``ctxs`` its cache
        and rotary tables. With ``need_output=False`` (re-cache pass) only the cache rows are written.
        """
        ...

    def forget(self, stream_id: str) -> None:
        """Drop per-stream derived state (e.g. text K/V) of a stream that left."""
        ...


def build_family(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, source: ModelSource, mla_form: str = "absorbed"
) -> ModelFamily:
    """The family implementation of ``cfg.family`` with its weights loaded. Raises ValueError on bad weights."""
    if cfg.family == "tiny":
        from workers.models.tiny import TinyFamily

        return TinyFamily(cfg, device, dtype, source.weights, mla_form)
    if cfg.family == "wan":
        from workers.models.wan.family import WanFamily

        return WanFamily(cfg, device, dtype, source)
    raise ValueError(f"unknown model family {cfg.family!r}")
