"""Few-step flow-matching sampler and the per-chunk noise that makes rollouts deterministic.

Flow matching: ``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the model predicts the velocity
``v = eps - x0``. Sampling integrates dx/dsigma = v with Euler steps from sigma=1 down to 0 over the
configured levels (4 by default, as Self-Forcing and CausVid use).

Noise of chunk ``i`` of a stream with seed ``s`` depends only on ``(s, i)``: a private generator is
seeded with a 64-bit mix of the two, so a stream resumed in another process, batched with other
streams or not, draws exactly the same noise.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread 63-bit seed for torch.Generator."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def chunk_noise(
    seed: int, chunk_index: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise of one chunk, on CPU (moved to the device by the caller)."""
    gen = torch.Generator(device="cpu").manual_seed(mix_seed(seed, chunk_index))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def euler_steps(sigmas: tuple[float, ...]) -> list[tuple[float, float]]:
    """(sigma, sigma_next) pairs from the configured levels down to 0."""
    levels = list(sigmas) + [0.0]
    return list(zip(levels[:-1], levels[1:]))


def step_noise(seed: int, chunk_index: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Fresh noise of the re-noising sampler after denoising step ``step``: a function of (seed, chunk, step)."""
    return chunk_noise(mix_seed(seed, chunk_index), step + 1, shape)


def sampler_update(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    x0: torch.Tensor,
    sigma: float,
    sigma_next: float,
    seeds: list[int],
    chunks: list[int],
    step: int,
) -> torch.Tensor:
    """One sampler step for a batch of chunks x [B, F, C, H, W] with predicted velocity v and clean x0.

    ``euler``: x + (sigma_next - sigma) * v (integrates dx/dsigma = v).
    ``renoise`` (Self-Forcing / CausVid / LongLive): the prediction x0, re-noised to sigma_next with
    fresh noise drawn from the stream's seeded generator, ``(1 - sigma_next) * x0 + sigma_next * eps``;
    the last step (sigma_next = 0) returns x0.
    """
    if kind == "euler":
        return x + (sigma_next - sigma) * v
    if sigma_next == 0:
        return x0
    eps = torch.stack([step_noise(s, c, step, tuple(x.shape[1:])) for s, c in zip(seeds, chunks)])
    return (1 - sigma_next) * x0 + sigma_next * eps.to(x.device, x.dtype)
