"""Tiny Wan-family parts for tests: a longroll config and a diffusers model with every parameter random."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from workers.config import ModelConfig
from workers.models.wan.model import transformer_config

# the shapes of REAL_MODELS.md's tiny WanTransformer3DModel; latent frames of 8x8 -> 16 tokens per frame
TINY_SHAPES = dict(
    latent_channels=4, latent_height=8, latent_width=8, patch=2, dim=24, num_heads=2, num_layers=2,
    ffn_dim=32, cond_dim=16, freq_dim=16, dtype="fp32", cache_dtype="fp32",
)  # fmt: skip


def tiny_cfg(preset: str = "self-forcing-1.3b", **overrides) -> ModelConfig:
    """A Wan-family preset's rollout at tiny shapes (fp32)."""
    return ModelConfig.from_name(preset, **{**TINY_SHAPES, **overrides})


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (Wan zero-initialises some, and checks would then pass trivially)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.3
            scale_like = name.endswith("weight") and ("norm2" in name or "norm_" in name)  # norms start near 1
            p.copy_(1 + noise if scale_like else noise)
    return model


def random_transformer(cfg: ModelConfig, seed: int = 0) -> WanTransformer3DModel:
    """diffusers' WanTransformer3DModel of a longroll config, all parameters random, eval mode."""
    model = WanTransformer3DModel(**transformer_config(cfg), rope_max_seq_len=32)
    return randomize(model, seed).eval()
