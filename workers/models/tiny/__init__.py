"""The tiny family: longroll's small causal video DiT (workers/models/tiny/model.py), also the world model.

Conditioning is a per-stream vector hashed from the prompt (a stand-in for a text encoder), fed to
AdaLN; per-frame actions steer the world model's camera.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ops.rope import apply_rope
from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.models.tiny.model import CausalVideoDiT
from workers.types import StreamSpec


def cond_vector(prompt: str, dim: int) -> torch.Tensor:
    """Deterministic unit-variance vector for a prompt (stand-in for a text encoder)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class TinyFamily:
    rotate = staticmethod(apply_rope)  # split-halves RoPE

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, weights: str | None, mla_form: str):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = CausalVideoDiT(cfg, mla_form)
        self.weights_sha = None
        if weights is not None:
            model.load_state_dict(load_file(weights), strict=True)
            self.weights_sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
        self.model = model.to(device, dtype).eval().requires_grad_(False)

    def conditioning(self, spec: StreamSpec) -> torch.Tensor:
        return cond_vector(spec.prompt, self.cfg.cond_dim).to(self.device)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        states: Sequence,
        actions: torch.Tensor,
        ctxs: list[StreamContext],
        need_output: bool = True,
    ) -> torch.Tensor | None:
        cond = torch.stack([s.cond for s in states]).to(self.dtype)
        return self.model(x, sigma, cond, actions, ctxs, need_output)

    def forget(self, stream_id: str) -> None:
        pass
