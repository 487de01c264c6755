"""The rollout API: ``Generator.new_stream(spec)`` and ``Generator.step(states)``.

One step generates the next chunk of every given stream in one batched forward per denoising step:

    noise(seed, i) --4 Euler steps over [sink | memory | window | chunk]--> clean chunk
    clean chunk --one pass at sigma=0 (re-cache)--> its rows enter each stream's cache ring

With no trained weights yet, the model is a seeded random initialisation (``ModelConfig.init_seed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from safetensors.torch import load_file

from ops.latent_cache import LatentKVCache
from ops.rope import Rope3D
from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.model import CausalVideoDiT
from workers.sampler import chunk_noise, euler_steps
from workers.state import StreamState
from workers.types import Chunk, StreamSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cond_vector(prompt: str, dim: int) -> torch.Tensor:
    """Deterministic unit-variance vector for a prompt (stand-in for a text encoder)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class Generator:
    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device | str = "cpu",
        weights: str | None = None,
        mla_form: str = "absorbed",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = _DTYPES[cfg.dtype]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = CausalVideoDiT(cfg, mla_form)
        if weights is not None:
            model.load_state_dict(load_file(weights), strict=True)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.rope = Rope3D(cfg.rope_width, cfg.rope_theta)
        self.policy = cfg.position_policy()
        self.config_hash = cfg.config_hash()
        self._steps = euler_steps(cfg.sigmas)
        grid_h, grid_w = cfg.grid
        self._spatial = self.rope.spatial_angles(grid_h, grid_w)  # (T_f, n_h + n_w), reused every chunk

    # ---- streams -----------------------------------------------------------------------------
    def new_stream(self, spec: StreamSpec) -> StreamState:
        return StreamState(
            spec=spec,
            config_hash=self.config_hash,
            cond=cond_vector(spec.prompt, self.cfg.cond_dim).to(self.device),
            cache=LatentKVCache(self.cfg.cache_layout(), self.device),
            frames_per_chunk=self.cfg.frames_per_chunk,
        )

    def check_state(self, state: StreamState) -> None:
        if state.config_hash != self.config_hash:
            raise ValueError(
                f"stream {state.stream_id!r} was produced by config {state.config_hash}, "
                f"this generator runs {self.config_hash}"
            )

    # ---- positions ---------------------------------------------------------------------------
    def _cos_sin(self, temporal_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every token of frames with these temporal ids: [F*T_f, rope/2]."""
        t_ang = self.rope.temporal_angles(temporal_ids)  # (F, n_t)
        n_f, t_f = t_ang.shape[0], self._spatial.shape[0]
        # (F, 1, n_t) ++ (1, T_f, n_hw) -> (F*T_f, pairs)
        ang = torch.cat(
            [t_ang[:, None, :].expand(n_f, t_f, -1), self._spatial[None].expand(n_f, t_f, -1)], dim=-1
        ).reshape(n_f * t_f, -1)
        return torch.cos(ang).to(self.device, self.dtype), torch.sin(ang).to(self.device, self.dtype)

    def _context(self, state: StreamState) -> StreamContext:
        cfg, cache = self.cfg, state.cache
        first = state.next_chunk * cfg.frames_per_chunk
        chunk_frames = torch.arange(first, first + cfg.frames_per_chunk)
        newest = first + cfg.frames_per_chunk - 1
        slots = cache.valid_slots()
        ids = [
            self.policy.temporal_ids(cache.frame_index[s : s + 1], cache.slot_kind(int(s)), newest)
            for s in slots.tolist()
        ]
        chunk_ids = self.policy.temporal_ids(chunk_frames, "local", newest)
        k_cos, k_sin = self._cos_sin(torch.cat([*ids, chunk_ids]))
        n_ctx = len(ids) * cfg.tokens_per_frame
        return StreamContext(cache, k_cos, k_sin, k_cos[n_ctx:], k_sin[n_ctx:])

    # ---- rollout -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, states: Sequence[StreamState], actions: torch.Tensor | None = None) -> list[Chunk]:
        """Generate the next chunk of every stream, batched.

        Args:
            states: streams to advance (each is updated in place).
            actions: optional [B, F, action_dim] per-frame actions; zeros when None.
        Returns:
            One Chunk per state, in order.
        """
        if not states:
            return []
        cfg = self.cfg
        for s in states:
            self.check_state(s)
        if len({s.stream_id for s in states}) != len(states):
            raise ValueError("a stream may appear only once per step")
        b, f = len(states), cfg.frames_per_chunk
        shape = (f, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        x = torch.stack([chunk_noise(s.spec.seed, s.next_chunk, shape) for s in states]).to(self.device, self.dtype)
        cond = torch.stack([s.cond for s in states]).to(self.dtype)
        if actions is None:
            actions = torch.zeros(b, f, cfg.action_dim)
        actions = actions.to(self.device, self.dtype)
        ctxs = [self._context(s) for s in states]

        for sigma, sigma_next in self._steps:
            sig = torch.full((b,), sigma, device=self.device)
            v = self.model(x, sig, cond, actions, ctxs)
            x = x + (sigma_next - sigma) * v  # Euler step of dx/dsigma = v

        # re-cache: the clean chunk at sigma = 0 writes its rows into every layer's cache
        for s, ctx in zip(states, ctxs):
            first = s.next_chunk * f
            ctx.plan = s.cache.plan_append(list(range(first, first + f)))
        self.model(x, torch.zeros(b, device=self.device), cond, actions, ctxs, need_output=False)

        chunks = []
        for i, (s, ctx) in enumerate(zip(states, ctxs)):
            s.cache.commit(ctx.plan)
            lat = x[i].float().cpu()
            frames = self.decode(lat) if self.can_decode else torch.empty(0, dtype=torch.uint8)
            chunks.append(Chunk(s.stream_id, s.next_chunk, s.next_chunk * f, lat, frames))
            s.next_chunk += 1
        return chunks

    @property
    def can_decode(self) -> bool:
        return self.cfg.can_decode

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [F, C, H, W] -> uint8 frames [F, H, W, 3].

        The tiny preset's latents are RGB pixels in [-1, 1]; presets with a VAE need its decoder,
        which longroll does not ship (they are for sizing and GPU benchmarks).
        """
        if not self.can_decode:
            raise NotImplementedError(f"preset {self.cfg.name!r} needs a VAE decoder, which is not shipped")
        # (F, 3, H, W) -> (F, H, W, 3)
        img = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).contiguous()
