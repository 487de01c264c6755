"""Chunk embedders: latents [F, C, H, W] -> one L2-normalized float32 vector [E] per chunk.

The default is deterministic and needs no training; the trainable convolutional autoencoder lives in
``memory_store/conv_ae.py``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F


@runtime_checkable
class Embedder(Protocol):
    """Maps one chunk's latents to a unit-norm embedding."""

    dim: int

    def embed(self, latents: torch.Tensor) -> np.ndarray:
        """latents: float [F, C, H, W] -> float32 [dim], L2-normalized."""
        ...


def check_latents(latents: torch.Tensor, in_channels: int) -> None:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != in_channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents {shape} must be a tensor [F, {in_channels}, H, W]")
    if not torch.isfinite(latents).all():
        raise ValueError("latents have non-finite values")


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Unit-norm float32 copy of ``v``; an all-zero vector maps to the first basis vector."""
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    if n == 0.0:
        out = np.zeros_like(v)
        out[0] = 1.0
        return out.astype(np.float32)
    return (v / n).astype(np.float32)


class PooledProjectionEmbedder:
    """Deterministic embedder: average-pool the chunk to a ``grid`` x ``grid`` map per channel (mean over
    frames), project with a fixed Gaussian matrix drawn from ``seed``, L2-normalize.

    Computed in float64 on CPU, so the same latents give the same embedding in every process.
    """

    def __init__(self, in_channels: int, dim: int = 64, seed: int = 0, grid: int = 2) -> None:
        if in_channels < 1 or dim < 1 or grid < 1:
            raise ValueError(f"{in_channels=}, {dim=}, {grid=} must all be >= 1")
        self.in_channels, self.dim, self.seed, self.grid = in_channels, dim, seed, grid
        features = in_channels * grid * grid
        g = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(features, dim, generator=g, dtype=torch.float64) / features**0.5

    def embed(self, latents: torch.Tensor) -> np.ndarray:
        check_latents(latents, self.in_channels)
        x = latents.detach().to("cpu", torch.float64)
        pooled = F.adaptive_avg_pool2d(x, self.grid).mean(dim=0)  # (F, C, g, g) -> (C, g, g)
        e = pooled.reshape(-1) @ self.projection  # (C*g*g,) @ (C*g*g, E) -> (E,)
        return l2_normalize(e.numpy())

    def embed_batch(self, latents: torch.Tensor) -> np.ndarray:
        """latents [B, F, C, H, W] -> float32 [B, E]."""
        return np.stack([self.embed(x) for x in latents])


class PoseEmbedder:
    """Camera-pose keys for world-model streams: random Fourier features of a chunk's mean pose.

    ``embed_poses(poses)`` maps the (y, x) poses of a chunk's frames (in patches) to
    ``[cos(w_i . p), sin(w_i . p)] / sqrt(dim / 2)`` with fixed frequencies ``w_i ~ N(0, 1 / bandwidth^2)``.
    The cosine similarity of two such keys is ``mean_i cos(w_i . (p - q))``, a kernel that is 1 at the
    same pose and falls off over about ``bandwidth`` patches, so cosine top-k over these keys returns
    the chunks whose camera stood nearest: the ones that saw what the next chunk will see.
    """

    def __init__(self, dim: int = 64, bandwidth: float = 3.0, seed: int = 0) -> None:
        if dim < 2 or dim % 2 or bandwidth <= 0:
            raise ValueError(f"{dim=} must be even and >= 2, {bandwidth=} must be > 0")
        self.dim, self.bandwidth = dim, bandwidth
        g = torch.Generator().manual_seed(seed)
        self.freqs = torch.randn(dim // 2, 2, generator=g, dtype=torch.float64) / bandwidth  # (E/2, 2)

    def embed_poses(self, poses: torch.Tensor) -> np.ndarray:
        """poses [F, 2] (y, x) in patches -> float32 [dim], unit norm."""
        p = poses.to(torch.float64).reshape(-1, 2).mean(dim=0)  # (2,)
        ang = self.freqs @ p  # (E/2,)
        return l2_normalize(torch.cat([torch.cos(ang), torch.sin(ang)]).numpy())


_CONV_AE_NAMES = (
    "ConvAEConfig",
    "ConvAEEmbedder",
    "TrainEmbedderResult",
    "train_embedder",
    "window_temporal_delta_loss",
)


def __getattr__(name: str):
    """The trainable embedder lives in ``conv_ae.py`` (it imports this module); re-export it lazily."""
    if name in _CONV_AE_NAMES:
        from memory_store import conv_ae

        return getattr(conv_ae, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
