"""Model + rollout configuration: one dataclass, validated at construction, with named presets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

from ops.latent_cache import TORCH_DTYPES, CacheLayout
from ops.positions import PositionPolicy
from ops.rope import split_rope_pairs

Attention = Literal["mha", "mla"]
Family = Literal["tiny", "wan"]
FAMILIES = ("tiny", "wan")
SAMPLERS = ("euler", "renoise")
MemoryMode = Literal["window", "retrieval", "sparse"]
MEMORY_MODES = ("window", "retrieval", "sparse")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"  # preset this config came from
    family: Family = "tiny"  # model family: "tiny" (workers/models/tiny) or "wan" (workers/models/wan)
    # -- latent video ------------------------------------------------------------------------
    latent_channels: int = 3  # channels of a latent frame (tiny: RGB pixels; Wan VAE: 16)
    latent_height: int = 32  # latent frame height
    latent_width: int = 32  # latent frame width
    patch: int = 4  # square spatial patch; tokens per frame = (H/patch) * (W/patch)
    vae_stride: tuple[int, int, int] = (1, 1, 1)  # (t, h, w) pixels per latent; tiny has no VAE
    fps: int = 16  # frames per second of the decoded video
    frames_per_chunk: int = 3  # latent frames generated per autoregressive step
    # -- transformer ---------------------------------------------------------------------------
    dim: int = 128  # model width
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads; head_dim = dim / num_heads
    ffn_mult: int = 4  # FFN hidden = ffn_mult * dim (when ffn_dim is 0)
    ffn_dim: int = 0  # FFN hidden width; 0: ffn_mult * dim (Wan2.1-1.3B: 8960)
    cond_dim: int = 32  # tiny: per-stream conditioning vector; wan: text embedding width (umT5-XXL: 4096)
    text_len: int = 512  # wan: prompt embeddings are zero-padded to this many tokens
    freq_dim: int = 256  # wan: width of the sinusoidal timestep embedding
    cross_attn_norm: bool = True  # wan: LayerNorm before the text cross-attention
    norm_eps: float = 1e-6  # wan: eps of the q/k RMSNorm and the LayerNorms
    action_dim: int = 2  # per-frame action (camera dx, dy); zeros when unused
    attention: Attention = "mla"  # "mha": per-head K/V cache; "mla": low-rank latent cache
    latent_dim: int = 64  # mla: d_c, shared latent width (a 4x4x3 patch is 48 values: room to copy one)
    rope_dim: int = 32  # mla: d_r, shared decoupled RoPE key width (5 pairs per spatial axis)
    rope_theta: float = 100.0  # RoPE frequency base (tiny: positions span < 100 tokens per axis)
    # -- cache and memory ----------------------------------------------------------------------
    sink_frames: int = 1  # first frames kept forever (frame sink)
    window_frames: int = 6  # local window ring (latent frames)
    memory_frames: int = 6  # slots for retrieved frames (memory="retrieval"/"sparse"); whole chunks
    memory_exclude_recent: int = 1  # retrieval: LongLive-RAG's R, most recently evicted chunks left out
    embedding_dim: int = 64  # retrieval: floats per chunk embedding in the memory store
    history_frames: int = 24  # sparse: far-history ring fed by frames evicted from the window
    sparse_top_k: int = 6  # sparse: context blocks each (query group, head) reads, sink included
    sparse_block: int = 64  # sparse: tokens per block (a power of two >= 16 for the Triton kernel)
    sparse_q_group: int = 64  # sparse: consecutive queries sharing one block selection
    memory: MemoryMode = "window"  # how far-back history enters the context
    position: Literal["absolute", "relative"] = "relative"  # temporal id policy
    max_temporal_id: int = 20  # relative policy: cap on the newest frame's temporal id
    cache_dtype: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"  # cache storage dtype
    fp8_scale: Literal["token", "frame"] = "token"  # fp8 cache: scale granularity
    # -- sampling ------------------------------------------------------------------------------
    sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # flow-matching noise levels, one per step
    denoising_steps: tuple[float, ...] = ()  # Self-Forcing's denoising_step_list (t in (0, 1000]); sets sigmas
    shift: float = 1.0  # timestep shift applied to denoising_steps: s' = shift*s / (1 + (shift-1)*s)
    sampler: Literal["euler", "renoise"] = "euler"  # euler: integrate v; renoise: x0, then fresh noise (Self-Forcing)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute dtype
    init_seed: int = 0  # seed of the random initialisation (used when no weights are loaded)
    # derived
    head_dim: int = field(init=False)
    tokens_per_frame: int = field(init=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.family=} must be one of {FAMILIES}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{self.sampler=} must be one of {SAMPLERS}")
        if self.denoising_steps:
            if self.shift <= 0 or any(not 0 < t <= 1000 for t in self.denoising_steps):
                raise ValueError(f"{self.denoising_steps=} must lie in (0, 1000] and {self.shift=} must be > 0")
            object.__setattr__(self, "sigmas", warp_sigmas(self.denoising_steps, self.shift))
        if self.ffn_dim < 0:
            raise ValueError(f"{self.ffn_dim=} must be >= 0")
        if self.family == "wan":
            if self.attention != "mha":
                raise ValueError("the wan family caches per-head K/V: use attention='mha' (MLA conversion is separate)")
            if self.memory == "sparse":
                raise ValueError("memory='sparse' reads the latent (MLA) cache, which the wan family does not have")
            if self.text_len < 1 or self.freq_dim < 2 or self.freq_dim % 2:
                raise ValueError(f"{self.text_len=} must be >= 1 and {self.freq_dim=} even and >= 2")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"{self.dim=} must be divisible by {self.num_heads=}")
        object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        if self.latent_height % self.patch or self.latent_width % self.patch:
            raise ValueError(f"latent frame {self.latent_height}x{self.latent_width} is not divisible by {self.patch=}")
        grid = (self.latent_height // self.patch) * (self.latent_width // self.patch)
        object.__setattr__(self, "tokens_per_frame", grid)
        for name in ("latent_channels", "num_layers", "frames_per_chunk", "fps", "ffn_mult", "cond_dim", "action_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.attention not in ("mha", "mla"):
            raise ValueError(f"{self.attention=} must be 'mha' or 'mla'")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"{self.memory=} must be one of {MEMORY_MODES}")
        if self.dtype not in ("fp32", "bf16", "fp16") or self.cache_dtype not in TORCH_DTYPES:
            raise ValueError(f"{self.dtype=} / {self.cache_dtype=} is not a supported dtype")
        if self.attention == "mla":
            try:
                split_rope_pairs(self.rope_dim)
            except ValueError as e:
                raise ValueError(f"rope_dim (d_r) does not fit the 3-D RoPE: {e}") from None
            if not 1 <= self.latent_dim <= self.dim:
                raise ValueError(f"{self.latent_dim=} (d_c) must be in [1, dim={self.dim}]")
            if self.latent_dim + self.rope_dim >= 2 * self.dim:
                raise ValueError(
                    f"d_c + d_r = {self.latent_dim + self.rope_dim} must be below the MHA row 2*dim={2 * self.dim}"
                )
        else:
            try:
                split_rope_pairs(self.head_dim)
            except ValueError as e:
                raise ValueError(f"head_dim does not fit the 3-D RoPE: {e}") from None
        if self.cache_dtype == "fp8" and self.attention != "mla":
            raise ValueError("the fp8 cache stores the MLA latent: use attention='mla'")
        if self.window_frames < self.frames_per_chunk:
            raise ValueError(f"{self.window_frames=} must hold one chunk ({self.frames_per_chunk=})")
        if self.sink_frames < 0 or self.memory_frames < 0 or self.memory_exclude_recent < 0:
            raise ValueError(f"{self.sink_frames=}, {self.memory_frames=}, {self.memory_exclude_recent=} must be >= 0")
        if self.memory == "sparse":
            if self.attention != "mla":
                raise ValueError("memory='sparse' reads the latent cache: use attention='mla'")
            blk = self.sparse_block
            if (
                blk < 16
                or blk & (blk - 1)
                or self.sparse_top_k < 1
                or self.sparse_q_group < 1
                or self.history_frames < 1
            ):
                raise ValueError(
                    f"{self.sparse_block=} must be a power of two >= 16; {self.sparse_top_k=}, "
                    f"{self.sparse_q_group=} and {self.history_frames=} must be >= 1"
                )
        if self.memory == "retrieval" and (self.memory_frames < 1 or self.memory_frames % self.frames_per_chunk):
            raise ValueError(
                f"retrieval needs {self.memory_frames=} to be a positive multiple of {self.frames_per_chunk=}"
            )
        span = self.sink_frames + self.window_frames + self.frames_per_chunk - 1
        if self.position == "relative" and self.max_temporal_id < span:
            raise ValueError(f"{self.max_temporal_id=} must be >= sink + window + chunk - 1 = {span}")
        PositionPolicy(self.position, max(self.max_temporal_id, 1))
        if (
            not self.sigmas
            or any(not 0 < s <= 1 for s in self.sigmas)
            or list(self.sigmas) != sorted(self.sigmas, reverse=True)
        ):
            raise ValueError(f"{self.sigmas=} must be decreasing values in (0, 1]")

    # ---- derived objects ---------------------------------------------------------------------
    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim or self.ffn_mult * self.dim

    @property
    def grid(self) -> tuple[int, int]:
        return self.latent_height // self.patch, self.latent_width // self.patch

    @property
    def rope_width(self) -> int:
        return self.rope_dim if self.attention == "mla" else self.head_dim

    @property
    def retrieval_k(self) -> int:
        """Chunks retrieved per step: as many as the memory slots hold."""
        return self.memory_frames // self.frames_per_chunk

    @property
    def window_chunks(self) -> int:
        """Whole chunks the local window holds."""
        return self.window_frames // self.frames_per_chunk

    @property
    def can_decode(self) -> bool:
        """True when latents are RGB pixels (no VAE); other presets need a decoder longroll does not ship."""
        return self.vae_stride == (1, 1, 1) and self.latent_channels == 3

    @property
    def uses_memory(self) -> bool:
        return self.memory != "window"

    def cache_layout(self) -> CacheLayout:
        return CacheLayout(
            kind=self.attention,
            num_layers=self.num_layers,
            tokens_per_frame=self.tokens_per_frame,
            sink_frames=self.sink_frames,
            memory_frames={"window": 0, "retrieval": self.memory_frames, "sparse": self.history_frames}[self.memory],
            window_frames=self.window_frames,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            latent_dim=self.latent_dim,
            rope_dim=self.rope_dim,
            dtype=self.cache_dtype,
            fp8_scale=self.fp8_scale,
        )

    def position_policy(self) -> PositionPolicy:
        return PositionPolicy(self.position, self.max_temporal_id)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def config_hash(self) -> str:
        """Hash of everything that changes what the model computes (used to match stored state)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()[:16]

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """A named preset, optionally with fields replaced.

        Raises:
            ValueError: unknown preset name or invalid overrides.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        for key in ("vae_stride", "sigmas", "denoising_steps"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def warp_sigmas(steps: tuple[float, ...], shift: float) -> tuple[float, ...]:
    """Timesteps t in (0, 1000] -> noise levels, warped by the shift as Self-Forcing / Wan do.

    ``[1000, 750, 500, 250]`` with shift 5 -> ``(1.0, 0.9375, 0.8333.., 0.625)``.
    """
    out = []
    for t in steps:
        s = t / 1000.0
        out.append(shift * s / (1 + (shift - 1) * s))
    return tuple(out)


# Wan2.1-T2V-1.3B: the shapes every Wan-family preset shares (a checkpoint's own config.json overrides them)
_WAN_1_3B = dict(
    family="wan",
    latent_channels=16,
    latent_height=60,  # 480 / 8
    latent_width=104,  # 832 / 8
    patch=2,  # (1, 2, 2) -> 30 x 52 = 1560 tokens per latent frame
    vae_stride=(4, 8, 8),
    fps=16,
    frames_per_chunk=3,
    dim=1536,
    num_layers=30,
    num_heads=12,  # head_dim 128: rotary pairs 22 / 21 / 21 (t / h / w)
    ffn_dim=8960,
    cond_dim=4096,  # umT5-XXL width
    text_len=512,
    freq_dim=256,
    attention="mha",  # the public checkpoints are MHA; K rows are cached after the q/k RMSNorm, unrotated
    rope_theta=10000.0,
    memory_frames=6,
    dtype="bf16",
    cache_dtype="bf16",
    sampler="renoise",
    denoising_steps=(1000.0, 750.0, 500.0, 250.0),
)

PRESETS: dict[str, ModelConfig] = {
    # The CPU demo: 32x32 RGB frames, no VAE, 64 tokens per frame, 4 blocks of width 128.
    "tiny": ModelConfig(),
    # Wan2.1-T2V-1.3B shapes (Self-Forcing / LongLive base): for sizing and GPU benchmarks.
    "wan-1.3b": ModelConfig(
        name="wan-1.3b",
        latent_channels=16,
        latent_height=60,  # 480 / 8
        latent_width=104,  # 832 / 8
        patch=2,  # -> 30 x 52 = 1560 tokens per latent frame
        vae_stride=(4, 8, 8),
        fps=16,
        frames_per_chunk=3,
        dim=1536,
        num_layers=30,
        num_heads=12,
        ffn_dim=8960,  # as Wan2.1
        cond_dim=4096,  # umT5-XXL width
        latent_dim=160,  # d_c + d_r = 224 (VideoMLA)
        rope_dim=64,
        rope_theta=10000.0,
        sink_frames=3,  # LongLive keeps the first chunk as the frame sink
        window_frames=18,  # sink + window = 21 latent frames, Self-Forcing's context
        memory_frames=6,  # LongLive-RAG retrieves ~6 frames
        max_temporal_id=23,
        dtype="bf16",
        cache_dtype="bf16",
    ),
    # Self-Forcing (guandeh17/Self-Forcing): 21 latent frames of context, absolute frame ids as trained
    "self-forcing-1.3b": ModelConfig(
        name="self-forcing-1.3b", **_WAN_1_3B, sink_frames=0, window_frames=18, position="absolute",
        max_temporal_id=20, shift=5.0,
    ),
    # CausVid (tianweiy/CausVid): the same rollout, timesteps warped with shift 8
    "causvid-1.3b": ModelConfig(
        name="causvid-1.3b", **_WAN_1_3B, sink_frames=0, window_frames=18, position="absolute",
        max_temporal_id=20, shift=8.0,
    ),
    # LongLive (NVlabs/LongLive): a frame sink of 3 latent frames and local attention of 12 latent frames
    # (sink + 6 cached + the 3 of the chunk); relative ids on read, as its infinite-length variant does
    "longlive-1.3b": ModelConfig(
        name="longlive-1.3b", **_WAN_1_3B, sink_frames=3, window_frames=6, position="relative",
        max_temporal_id=11, shift=5.0,
    ),
}  # fmt: skip
