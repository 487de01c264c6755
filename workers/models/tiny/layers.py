"""Small building blocks of the causal video DiT: embeddings, norms, FFN, AdaLN modulation."""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of noise levels. sigma: [B] in [0, 1] -> [B, dim] (fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = (sigma.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x [B, S, D], shift/scale [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F*(H/p)*(W/p), p*p*C), frame-major then row-major tokens."""
    b, f, c, h, w = x.shape
    x = x.reshape(b, f, c, h // p, p, w // p, p)
    # (B, F, C, h, p, w, p) -> (B, F, h, w, p, p, C)
    x = x.permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(b, f * (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, frames: int, channels: int, height: int, width: int, p: int) -> torch.Tensor:
    """(B, F*h*w, p*p*C) -> (B, F, C, H, W); inverse of :func:`patchify`."""
    b = x.shape[0]
    h, w = height // p, width // p
    x = x.reshape(b, frames, h, w, p, p, channels)
    # (B, F, h, w, p, p, C) -> (B, F, C, h, p, w, p)
    x = x.permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(b, frames, channels, height, width)
