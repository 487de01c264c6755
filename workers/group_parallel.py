"""One generator spread over the N ranks of a torch.distributed group (SPMD: every rank runs this code).

Sequence parallelism over the tokens of a frame, with the latent cache sharded the same way:

    rank r owns tokens [r*T_f/N, (r+1)*T_f/N) of every latent frame, of the chunk *and* of the cache
    patch/action embedding, AdaLN, projections, FFN and head: on the rank's own tokens only (1/N of the rows)
    attention, per layer and stream: all-gather the latent rows [c_kv | k_rope] (d_c + d_r per token) of
        the rank's cache shard and of its new chunk tokens, put them back into single-process token
        order, and attend with the rank's queries over the whole context
    re-cache: each rank writes the rows of its own tokens into its own shard (no communication)
    output: all-gather the head's output tokens, so every rank holds the whole chunk

Why not split heads (tensor/Ulysses parallelism): with an MLA cache every head reads the same latent,
so a head split cannot shard the cache (each rank would need all of it), and moving queries instead of
keys costs more (H * (d_c + d_r) values per query token vs d_c + d_r per key token). Gathering keys
in the single-process order keeps every reduction the same as on one process, so the group's output
is bit-identical to :class:`workers.generator.Generator` on CPU (see docs/generator_groups.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from ops import dispatch
from ops.latent_cache import LatentKVCache
from ops.rope import apply_rope
from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.generator import Generator
from workers.models.tiny import cond_vector
from workers.models.tiny.attention import MLAttention
from workers.models.tiny.layers import modulate, patchify, unpatchify
from workers.sampler import chunk_noise
from workers.state import StreamState
from workers.types import Chunk, StreamSpec


@dataclass(frozen=True)
class Shard:
    """Which tokens of each latent frame one rank owns."""

    rank: int  # this rank, 0 <= rank < size
    size: int  # ranks in the group
    tokens_per_frame: int  # T_f of the full frame

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"{self.rank=} must be in [0, {self.size=})")
        if self.tokens_per_frame % self.size:
            raise ValueError(f"{self.tokens_per_frame=} must be divisible by the group {self.size=}")

    @property
    def local_tokens(self) -> int:
        return self.tokens_per_frame // self.size

    def token_index(self, frames: int) -> torch.Tensor:
        """[frames * T_loc] int64: this rank's tokens among ``frames`` frames of T_f tokens (frame-major)."""
        t_f, t_loc = self.tokens_per_frame, self.local_tokens
        # (F, 1) * T_f + (1, T_loc) -> (F*T_loc,)
        return (torch.arange(frames)[:, None] * t_f + self.rank * t_loc + torch.arange(t_loc)[None, :]).flatten()


def check_group(cfg: ModelConfig, size: int) -> None:
    """Raise ValueError unless ``size`` ranks can run ``cfg`` as one generator group."""
    if size < 1:
        raise ValueError(f"{size=} must be >= 1")
    if cfg.attention != "mla" or cfg.memory != "window":
        raise ValueError(f"generator groups need attention='mla' and memory='window': {cfg.attention=}, {cfg.memory=}")
    if cfg.tokens_per_frame % size:
        raise ValueError(f"{cfg.tokens_per_frame=} must be divisible by the group size {size}")


class Comm:
    """The collectives the group needs, over the default torch.distributed process group."""

    def __init__(self):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*] on every rank -> [N, *] in rank order, on every rank."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t)
        return torch.stack(out)

    def gather(self, t: torch.Tensor) -> torch.Tensor | None:
        """[*] on every rank -> [N, *] on rank 0 (None elsewhere)."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(t, out, dst=0)
        return torch.stack(out) if self.rank == 0 else None


def interleave(gathered: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-rank token shards back into frame-major single-process order.

    Args:
        gathered: [N, frames * T_loc, *rest] (from :meth:`Comm.all_gather`).
    Returns:
        [frames * N * T_loc, *rest]
    """
    n, rest = gathered.shape[0], gathered.shape[2:]
    # (N, F*T_loc, *) -> (N, F, T_loc, *) -> (F, N, T_loc, *) -> (F*T_f, *)
    g = gathered.reshape(n, frames, -1, *rest).transpose(0, 1)
    return g.reshape(-1, *rest)


class ShardedMLAttention(nn.Module):
    """:class:`MLAttention` on a rank's tokens: gathers the latent keys, writes only its own cache shard."""

    def __init__(self, attn: MLAttention, comm: Comm):
        super().__init__()
        if attn.sparse:
            raise ValueError("sparse memory is not supported by generator groups")
        self.attn, self.comm = attn, comm

    def forward(self, x: torch.Tensor, layer: int, ctxs: list[StreamContext]) -> torch.Tensor:
        a = self.attn
        b, s, _ = x.shape  # s = F * T_loc: this rank's tokens of the chunk
        # (B, s, H*(d_nope + d_r)) -> (B, s, H, d_nope + d_r)
        q = a.q_proj(x).reshape(b, s, a.heads, a.d_nope + a.d_r)
        q_nope, q_rope = q.split([a.d_nope, a.d_r], dim=-1)
        ckv, k_rope = a.kv_down(x).split([a.d_c, a.d_r], dim=-1)  # (B, s, d_c), (B, s, d_r)
        ckv = a.kv_norm(ckv)
        if a.form == "absorbed":
            q_lat = torch.einsum("bshn,hnc->bshc", q_nope, a.w_uk)  # (B, s, H, d_c)
        outs = []
        for i, ctx in enumerate(ctxs):
            rows, slots = ctx.cache.read(layer, x.dtype, ctx.slots)  # (n_slots*T_loc, d_c + d_r)
            new = torch.cat([ckv[i], k_rope[i]], dim=-1)  # (F*T_loc, d_c + d_r)
            n_ctx = len(slots)
            frames = n_ctx + s // ctx.cache.layout.tokens_per_frame  # context frames + the chunk's
            full = interleave(self.comm.all_gather(torch.cat([rows, new])), frames)  # (frames*T_f, d_c + d_r)
            n = rows.shape[0] * self.comm.size  # context tokens of the whole frame set
            ctx_rows, new_rows = full[:n], full[n:]
            c_all = torch.cat([ctx_rows[:, : a.d_c], new_rows[:, : a.d_c]], dim=0)  # (S_ctx + S, d_c)
            r_all = torch.cat([ctx_rows[:, a.d_c :], new_rows[:, a.d_c :]], dim=0)  # (S_ctx + S, d_r)
            r_rot = apply_rope(r_all, ctx.k_cos, ctx.k_sin)
            qr_rot = apply_rope(q_rope[i], ctx.q_cos[:, None, :], ctx.q_sin[:, None, :])
            if a.form == "absorbed":
                o_lat = dispatch.latent(q_lat[i], qr_rot, c_all, r_rot, a.scale)  # (s, H, d_c)
                outs.append(torch.einsum("shc,hvc->shv", o_lat, a.w_uv))
            else:
                k_nope = torch.einsum("kc,hnc->khn", c_all, a.w_uk)  # (S_k, H, d_nope)
                v = torch.einsum("kc,hvc->khv", c_all, a.w_uv)
                k = torch.cat([k_nope, r_rot[:, None, :].expand(-1, a.heads, -1)], dim=-1)
                outs.append(dispatch.mha(torch.cat([q_nope[i], qr_rot], dim=-1), k, v, a.scale))
            if ctx.plan is not None:
                ctx.cache.write_slots(layer, ctx.plan.slots, new)
        # (B, s, H, d_v) -> (B, s, H*d_v)
        return a.out(torch.stack(outs).reshape(b, s, -1))


class GroupGenerator(Generator):
    """The SPMD part of a generator group: this rank's shard of every stream's cache and tokens.

    Stream states it holds are *shards*: same bookkeeping as a single-process state, cache rows of this
    rank's tokens only. :meth:`shard_state` / :meth:`full_state` convert from / to the single-process
    form (which checkpoints and migrations use, so a group and a single worker read each other's state).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        comm: Comm,
        device: torch.device | str = "cpu",
        mla_form: str = "absorbed",
        weights: str | None = None,
    ):
        check_group(cfg, comm.size)
        super().__init__(cfg, device=device, mla_form=mla_form, weights=weights)
        self.comm = comm
        self.shard = Shard(comm.rank, comm.size, cfg.tokens_per_frame)
        self.layout = replace(cfg.cache_layout(), tokens_per_frame=self.shard.local_tokens)
        self.q_index = self.shard.token_index(cfg.frames_per_chunk).to(self.device)
        for block in self.model.blocks:
            block.attn = ShardedMLAttention(block.attn, comm)

    # ---- shard <-> single-process state ------------------------------------------------------
    def new_stream(self, spec: StreamSpec) -> StreamState:
        cond = cond_vector(spec.prompt, self.cfg.cond_dim).to(self.device)
        cache = LatentKVCache(self.layout, self.device)
        return StreamState(spec, self.config_hash, cond, cache, frames_per_chunk=self.cfg.frames_per_chunk)

    def _per_token(self, t: torch.Tensor, t_f: int) -> torch.Tensor:
        # (L, slots*T, *) -> (L, slots, T, *)
        return t.reshape(t.shape[0], self.layout.slot_frames, t_f, *t.shape[2:])

    def shard_state(self, full: StreamState) -> StreamState:
        """This rank's shard of a single-process state (no communication)."""
        self.check_state(full)
        cache, out = full.cache, self.new_stream(full.spec)
        t_f, t_loc, r = self.cfg.tokens_per_frame, self.shard.local_tokens, self.shard.rank
        # (L, slots, T_f, W) -> (L, slots, T_loc, W) -> (L, slots*T_loc, W)
        own = self._per_token(cache.data, t_f)[:, :, r * t_loc : (r + 1) * t_loc]
        out.cache.data.copy_(own.reshape(out.cache.data.shape))
        if cache.scale is not None:
            scale = cache.scale
            if self.layout.fp8_scale == "token":
                scale = self._per_token(scale, t_f)[:, :, r * t_loc : (r + 1) * t_loc].reshape(out.cache.scale.shape)
            out.cache.scale.copy_(scale)
        self._copy_bookkeeping(full, out)
        return out

    def full_state(self, shard: StreamState) -> StreamState | None:
        """Collective: the single-process form of a stream, on rank 0 (None on the other ranks)."""
        data = self.comm.gather(shard.cache.data)  # (N, L, slots*T_loc, W)
        scale = None
        if shard.cache.scale is not None and self.layout.fp8_scale == "token":
            scale = self.comm.gather(shard.cache.scale)
        if self.comm.rank != 0:
            return None
        cfg = self.cfg
        out = StreamState(shard.spec, self.config_hash, shard.cond, LatentKVCache(cfg.cache_layout(), self.device),
                          frames_per_chunk=cfg.frames_per_chunk)  # fmt: skip
        t_loc = self.shard.local_tokens
        # (N, L, slots*T_loc, W) -> (N, L, slots, T_loc, W) -> (L, slots, N, T_loc, W) -> (L, slots*T_f, W)
        full = data.reshape(data.shape[0], data.shape[1], self.layout.slot_frames, t_loc, -1).permute(1, 2, 0, 3, 4)
        out.cache.data.copy_(full.reshape(out.cache.data.shape))
        if shard.cache.scale is not None:
            if scale is None:  # per-frame scales are the same on every rank
                out.cache.scale.copy_(shard.cache.scale)
            else:
                full = scale.reshape(scale.shape[0], scale.shape[1], self.layout.slot_frames, t_loc, 2)
                out.cache.scale.copy_(full.permute(1, 2, 0, 3, 4).reshape(out.cache.scale.shape))
        self._copy_bookkeeping(shard, out)
        return out

    @staticmethod
    def _copy_bookkeeping(src: StreamState, dst: StreamState) -> None:
        dst.cache.frame_index.copy_(src.cache.frame_index)
        dst.cache.window_written, dst.cache.memory_written = src.cache.window_written, src.cache.memory_written
        dst.next_chunk, dst.memory_query, dst.memory_chunks = src.next_chunk, src.memory_query, src.memory_chunks

    # ---- rollout -----------------------------------------------------------------------------
    def _forward(self, x, sigma, cond, actions, ctxs, need_output: bool = True) -> torch.Tensor | None:
        """:meth:`CausalVideoDiT.forward` on this rank's tokens; the velocity comes back whole on every rank."""
        m, cfg = self.model, self.cfg
        b, f = x.shape[:2]
        t_f = cfg.tokens_per_frame
        tok = m.patch_embed(patchify(x, cfg.patch)[:, self.q_index])  # (B, F*T_loc, dim)
        # (B, F, dim) -> (B, F, T_f, dim) -> (B, F*T_f, dim) -> this rank's (B, F*T_loc, dim)
        act = m.action_embed(actions)[:, :, None, :].expand(b, f, t_f, cfg.dim).reshape(b, f * t_f, cfg.dim)
        tok = tok + act[:, self.q_index]
        t_emb, e = m.conditioning(sigma, cond)
        for layer, block in enumerate(m.blocks):
            tok = block(tok, e, layer, ctxs)
        if not need_output:
            return None
        shift, scale = (m.head_modulation + t_emb[:, None, :]).unbind(1)
        out = m.head(modulate(m.head_norm(tok), shift, scale))  # (B, F*T_loc, p*p*C)
        # (N, B, F*T_loc, pc) -> (B, N, F*T_loc, pc) -> per batch row: (F*T_f, pc)
        gathered = self.comm.all_gather(out).transpose(0, 1)
        out = torch.stack([interleave(g, f) for g in gathered])
        return unpatchify(out, f, cfg.latent_channels, cfg.latent_height, cfg.latent_width, cfg.patch)

    @torch.inference_mode()
    def step(self, states: Sequence[StreamState], actions: torch.Tensor | None = None) -> list[Chunk]:
        """:meth:`Generator.step` over shard states (window memory). Every rank returns the same chunks."""
        if not states:
            return []
        cfg = self.cfg
        for s in states:
            self.check_state(s)
        b, f = len(states), cfg.frames_per_chunk
        shape = (f, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        x = torch.stack([chunk_noise(s.spec.seed, s.next_chunk, shape) for s in states]).to(self.device, self.dtype)
        cond = torch.stack([s.cond for s in states]).to(self.dtype)
        actions = self._step_actions(states, actions)
        ctxs = []
        for s in states:
            ctx = self._context(s, self._chunk_frames(s))
            ctx.q_cos, ctx.q_sin = ctx.q_cos[self.q_index], ctx.q_sin[self.q_index]  # this rank's queries
            ctxs.append(ctx)
        for sigma, sigma_next in self._steps:
            v = self._forward(x, torch.full((b,), sigma, device=self.device), cond, actions, ctxs)
            x = x + (sigma_next - sigma) * v  # Euler step of dx/dsigma = v
        self._apply_prompts(states, x)
        for s, ctx in zip(states, ctxs):
            ctx.plan = s.cache.plan_append(self._chunk_frames(s).tolist())
        self._forward(x, torch.zeros(b, device=self.device), cond, actions, ctxs, need_output=False)
        chunks = []
        for i, (s, ctx) in enumerate(zip(states, ctxs)):
            s.cache.commit(ctx.plan)
            lat = x[i].float().cpu()
            frames = self.decode(lat) if self.can_decode else torch.empty(0, dtype=torch.uint8)
            chunks.append(Chunk(s.stream_id, s.next_chunk, s.next_chunk * f, lat, frames, None, s.memory_chunks))
            s.next_chunk += 1
        return chunks
