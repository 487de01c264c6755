"""How many streams one worker can hold: the device's free memory over one stream's bytes.

One stream holds its cache at capacity, a chunk's activations and, when a VAE decodes its video, its
decoder feature cache (orchestrator.plan.stream_budget and vae_sizes: the figures `longroll plan` prints).
The worker measures free memory after its model (and VAE) are loaded, keeps HEADROOM of it free, and
refuses a stream past that count; the orchestrator assigns no more than a worker says it holds.
"""

from __future__ import annotations

import psutil
import torch

from workers.config import ModelConfig

HEADROOM = 0.10  # of the free memory, left to the allocator, fragmentation and the CUDA context


def stream_bytes(cfg: ModelConfig, decodes: bool) -> int:
    from orchestrator.plan import stream_budget, vae_sizes

    per = stream_budget(cfg).total
    if decodes:
        per += vae_sizes(cfg)[1]
    return per


def free_bytes(device: str) -> int:
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(psutil.virtual_memory().available)


def capacity(cfg: ModelConfig, decodes: bool, device: str, free: int | None = None) -> int:
    """Streams this worker can hold (at least 0) given ``free`` bytes (measured now when None)."""
    free = free_bytes(device) if free is None else free
    return max(0, int(free * (1 - HEADROOM)) // max(1, stream_bytes(cfg, decodes)))
