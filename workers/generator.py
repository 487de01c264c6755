"""The rollout API: ``Generator.new_stream(spec)`` and ``Generator.step(states)``.

One step generates the next chunk of every given stream in one batched forward per denoising step:

    noise(seed, i) --4 Euler steps over [sink | memory | window | chunk]--> clean chunk
    clean chunk --one pass at sigma=0 (re-cache)--> its rows enter each stream's cache ring

With no trained weights yet, the model is a seeded random initialisation (``ModelConfig.init_seed``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np
import structlog
import torch

from ops.latent_cache import AppendPlan, LatentKVCache
from ops.rope import Rope3D
from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.models.family import build_family
from workers.models.source import ModelSource
from workers.sampler import chunk_noise, euler_steps, sampler_update
from workers.state import StreamState
from workers.types import Chunk, StreamSpec
from workers.world.camera import StreamCamera

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = structlog.get_logger(__name__)


class MemorySearch(Protocol):
    """What the generator needs from the memory store (``memory_store.retriever.Retriever`` fits)."""

    def search(self, stream_id: str, query: np.ndarray, k: int, *, before_chunk: int, exclude_recent: int) -> list: ...

    def prefetch(self, stream_id: str, query: np.ndarray, k: int, **kwargs) -> Future: ...


class ChunkEmbedder(Protocol):
    def embed(self, latents: torch.Tensor) -> np.ndarray: ...


class Generator:
    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device | str = "cpu",
        weights: str | None = None,
        mla_form: str = "absorbed",
        memory: MemorySearch | None = None,
        embedder: ChunkEmbedder | None = None,
        source: ModelSource | None = None,
        decode_video: bool = True,
    ):
        """
        Args:
            cfg: model and rollout config (``cfg.family`` picks the model family).
            device: where the model and caches live.
            weights: optional weights file (tiny: a safetensors state dict; else the seeded random init).
            mla_form: "absorbed" or "upprojected" MLA attention (same results).
            memory: the retrieval source, required for ``cfg.memory == "retrieval"``.
            embedder: computes each chunk's retrieval embedding (``Chunk.embedding``); required
                with ``memory``.
            source: all weights options of the family (replaces ``weights`` when given).
            decode_video: with ``source.vae``, decode each chunk here (False: a decode pool does it).
        Raises:
            ValueError: retrieval without a memory source or embedder.
        """
        if cfg.memory == "retrieval" and (memory is None or embedder is None):
            raise ValueError("memory='retrieval' needs a memory source and an embedder")
        self.cfg = cfg
        self.memory = memory if cfg.memory == "retrieval" else None
        self.embedder = embedder
        self._prefetched: dict[tuple[str, int], Future] = {}  # at most one per stream: its next chunk's
        # per stream: chunk index -> (its encoded memory rows, their bytes), an LRU bounded in bytes
        self._memory_rows: dict[str, OrderedDict[int, tuple]] = {}
        self._memory_row_bytes: dict[str, int] = {}
        store = getattr(memory, "config", None)
        self.memory_row_cache_bytes = getattr(store, "encoded_row_cache_bytes", 8 * 2**20)
        self.encodes = 0  # retrieved chunks encoded (LRU misses), for benchmarks
        self.retrieval_ms: dict[str, float] = {}  # per stream: how long its last step waited for retrieval
        self.device = torch.device(device)
        self.dtype = _DTYPES[cfg.dtype]
        self.family = build_family(cfg, self.device, self.dtype, source or ModelSource(weights=weights), mla_form)
        self.model = getattr(self.family, "model", None)  # the family's nn.Module
        self.weights_sha = self.family.weights_sha
        self.pixels = None  # StreamPixels: the VAE decoder of a Wan-family run that writes video
        if source is not None and source.vae is not None:
            from workers.pixels import StreamPixels, vae_digest

            if decode_video:  # else a decode pool (workers.decode_pool) decodes this generator's latents
                self.pixels = StreamPixels(source.vae, self.device, self.dtype)
            # a stream's video depends on the VAE too: its checkpoints are bound to it
            self.weights_sha = f"{self.weights_sha or 'random'}-vae{vae_digest(source.vae)}"
        self.trace: dict[str, torch.Tensor] | None = None  # set to {} to record every step (see record_trace)
        self.rope = Rope3D(cfg.rope_width, cfg.rope_theta)
        self.policy = cfg.position_policy()
        # streams, checkpoints and stored history are bound to the config and the weights
        self.config_hash = cfg.config_hash() if self.weights_sha is None else f"{cfg.config_hash()}-{self.weights_sha}"
        self._steps = euler_steps(cfg.sigmas)
        self.camera = StreamCamera(cfg)  # poses, actions and prompts of world-model streams

    # ---- streams -----------------------------------------------------------------------------
    def new_stream(self, spec: StreamSpec) -> StreamState:
        return StreamState(
            spec=spec,
            config_hash=self.config_hash,
            cond=self.family.conditioning(spec),
            cache=LatentKVCache(self.cfg.cache_layout(), self.device),
            frames_per_chunk=self.cfg.frames_per_chunk,
        )

    def forget(self, stream_id: str) -> None:
        """Drop per-stream caches (encoded memory rows, pending prefetches) of a stream that left."""
        self._memory_rows.pop(stream_id, None)
        self._memory_row_bytes.pop(stream_id, None)
        self.retrieval_ms.pop(stream_id, None)
        self.family.forget(stream_id)
        if self.pixels is not None:
            self.pixels.forget(stream_id)
        for key in [k for k in self._prefetched if k[0] == stream_id]:
            self._prefetched.pop(key).cancel()

    def check_state(self, state: StreamState) -> None:
        if state.config_hash != self.config_hash:
            raise ValueError(
                f"stream {state.stream_id!r} was produced by config {state.config_hash}, "
                f"this generator runs {self.config_hash}"
            )

    # ---- camera (world-model streams) --------------------------------------------------------
    def _step_actions(self, states: Sequence[StreamState], actions: torch.Tensor | None) -> torch.Tensor:
        """[B, F, action_dim] actions of a step: as given, else each stream's own trajectory."""
        if actions is None:
            actions = torch.stack([self.camera.actions(s.spec, self._chunk_frames(s)) for s in states])
        return actions.to(self.device, self.dtype)

    def _apply_prompts(self, states: Sequence[StreamState], x: torch.Tensor) -> None:
        """World prompt: chunk 0 of a world stream is its true view, not the sample (x: [B, F, C, H, W])."""
        for i, s in enumerate(states):
            view = self.camera.prompt_frames(s.spec, s.next_chunk, self._chunk_frames(s))
            if view is not None:
                x[i] = view.to(x)

    # ---- positions ---------------------------------------------------------------------------
    def _cos_sin(
        self, temporal_ids: torch.Tensor, poses: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every token of frames with these temporal ids (and camera poses): [F*T_f, rope/2]."""
        ang = self.rope.frame_angles(temporal_ids, *self.cfg.grid, poses)  # (F*T_f, pairs)
        return torch.cos(ang).to(self.device, self.dtype), torch.sin(ang).to(self.device, self.dtype)

    def _context(
        self, state: StreamState, q_frames: torch.Tensor, q_kind: str = "local", slots: torch.Tensor | None = None
    ) -> StreamContext:
        """Rotary tables for queries of frames ``q_frames`` over the cache slots ``slots`` (default: all valid)."""
        cache = state.cache
        newest = int(q_frames.max())
        slots = cache.valid_slots() if slots is None else slots
        ids = [
            self.policy.temporal_ids(cache.frame_index[s : s + 1], cache.slot_kind(int(s)), newest)
            for s in slots.tolist()
        ]
        q_ids = self.policy.temporal_ids(q_frames, q_kind, newest)
        frames = torch.cat([cache.frame_index[slots].to(torch.int64), q_frames.to(torch.int64)])
        k_cos, k_sin = self._cos_sin(torch.cat([*ids, q_ids]), self.camera.poses(state.spec, frames))
        t_f = self.cfg.tokens_per_frame
        n_ctx = len(ids) * t_f
        kinds = cache.kind_counts(slots)
        return StreamContext(
            cache, k_cos, k_sin, k_cos[n_ctx:], k_sin[n_ctx:], slots=slots,
            sink_tokens=kinds["sink"] * t_f, window_start=(kinds["sink"] + kinds["memory"]) * t_f,
        )  # fmt: skip

    def _chunk_frames(self, state: StreamState) -> torch.Tensor:
        first = state.next_chunk * self.cfg.frames_per_chunk
        return torch.arange(first, first + self.cfg.frames_per_chunk)

    # ---- retrieval memory --------------------------------------------------------------------
    def _search_kwargs(self, next_chunk: int) -> dict[str, Any]:
        # candidates: chunks wholly evicted from the window, minus the R most recently evicted
        return dict(before_chunk=next_chunk - self.cfg.window_chunks, exclude_recent=self.cfg.memory_exclude_recent)

    def _retrieve(self, state: StreamState) -> list:
        key = (state.stream_id, state.next_chunk)
        fut = self._prefetched.pop(key, None)
        if fut is not None:
            return fut.result()
        query = state.memory_query.cpu().numpy()
        return self.memory.search(state.stream_id, query, self.cfg.retrieval_k, **self._search_kwargs(state.next_chunk))

    def _prefetch(self, state: StreamState) -> None:
        """Start the next chunk's retrieval now, so it overlaps with the caller's writes."""
        if not hasattr(self.memory, "prefetch"):
            return
        key = (state.stream_id, state.next_chunk)
        for stale in [k for k in self._prefetched if k[0] == state.stream_id]:  # never used: the stream moved on
            self._prefetched.pop(stale).cancel()
        self._prefetched[key] = self.memory.prefetch(
            state.stream_id,
            state.memory_query.cpu().numpy(),
            self.cfg.retrieval_k,
            **self._search_kwargs(state.next_chunk),
        )

    def _refresh_memory(self, state: StreamState) -> None:
        """Fill the memory slots with the retrieved chunks (LongLive-RAG).

        Each retrieved chunk passes through the model at sigma=0 with the sink as context, so its rows
        are a function of (its latents, the stream's sink, the stream vector) only: they are computed
        once and kept in a small per-stream LRU while the chunk keeps being retrieved. Rows sit at the
        sink's temporal position, as the position policy says for memory slots.
        """
        if state.memory_query is None:
            return
        t0 = time.perf_counter()
        hits = sorted(self._retrieve(state), key=lambda h: h.chunk_index)
        self.retrieval_ms[state.stream_id] = (time.perf_counter() - t0) * 1e3
        chosen = tuple(h.chunk_index for h in hits)
        if chosen == state.memory_chunks or not hits:
            return
        frames = [list(range(h.first_frame, h.first_frame + h.num_frames)) for h in hits]
        slots = state.cache.assign_memory([f for fr in frames for f in fr])
        lru = self._memory_rows.setdefault(state.stream_id, OrderedDict())
        sink = state.cache.slots_of("sink")
        start = 0
        for hit, fr in zip(hits, frames):
            own = slots[start : start + len(fr)]
            start += len(fr)
            if hit.chunk_index in lru:
                lru.move_to_end(hit.chunk_index)
                state.cache.import_slots(own, *lru[hit.chunk_index][0])
                continue
            ctx = self._context(state, torch.tensor(fr), "memory", slots=sink)
            ctx.plan = AppendPlan(frames=fr, slots=own)
            lat = hit.latents.to(self.device, self.dtype)[None]  # (1, F, C, H, W)
            acts = self.camera.actions(state.spec, torch.tensor(fr))[None].to(self.device, self.dtype)
            sigma = torch.zeros(1, device=self.device)
            self.family.forward(lat, sigma, [state], acts, [ctx], need_output=False)
            self.encodes += 1
            self._remember_rows(state.stream_id, lru, hit.chunk_index, state.cache.export_slots(own))
        state.memory_chunks = chosen
        log.debug("memory.refresh", stream_id=state.stream_id, chunk_index=state.next_chunk, memory=chosen)

    def _remember_rows(self, sid: str, lru: OrderedDict, chunk_index: int, rows: tuple) -> None:
        """Keep a chunk's encoded rows while they fit the stream's byte budget (oldest out first)."""
        size = sum(t.numel() * t.element_size() for t in rows if isinstance(t, torch.Tensor))
        if size > self.memory_row_cache_bytes:
            return
        used = self._memory_row_bytes.get(sid, 0) + size
        lru[chunk_index] = (rows, size)
        while used > self.memory_row_cache_bytes:
            _, (_, gone) = lru.popitem(last=False)
            used -= gone
        self._memory_row_bytes[sid] = used

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the generator holds beyond the streams' caches, by structure, over all its streams (and the
        count of retrievals in flight)."""
        out = {"encoded_rows": sum(self._memory_row_bytes.values()), "prefetches_in_flight": len(self._prefetched)}
        if self.memory is not None and hasattr(self.memory, "memory_bytes"):
            out.update(self.memory.memory_bytes())
        return out

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
        actions = self._step_actions(states, actions)
        if self.memory is not None:
            for s in states:
                self._refresh_memory(s)
        ctxs = [self._context(s, self._chunk_frames(s)) for s in states]

        for j, (sigma, sigma_next) in enumerate(self._steps):
            sig = torch.full((b,), sigma, device=self.device)
            v = self.family.forward(x, sig, states, actions, ctxs)
            x0 = x - sigma * v  # flow matching: x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0
            self.record_trace(states, j, x, sigma, x0)
            x = sampler_update(cfg.sampler, x, v, x0, sigma, sigma_next, [s.spec.seed for s in states],
                               [s.next_chunk for s in states], j)  # fmt: skip
        self._apply_prompts(states, x)

        # re-cache: the clean chunk at sigma = 0 writes its rows into every layer's cache
        spill = []  # sparse memory: rows of the frames the re-cache pass evicts from the window
        for s, ctx in zip(states, ctxs):
            ctx.plan = s.cache.plan_append(self._chunk_frames(s).tolist())
            if self.cfg.memory == "sparse" and ctx.plan.evicted:
                spill.append((s, ctx.plan.evicted, s.cache.export_slots(ctx.plan.evicted_slots)))
        self.family.forward(x, torch.zeros(b, device=self.device), states, actions, ctxs, need_output=False)

        for s, ctx in zip(states, ctxs):
            s.cache.commit(ctx.plan)
        for s, frames, (rows, scale) in spill:
            s.cache.push_memory(frames, rows, scale)  # evicted frames become far history
        chunks = []
        for i, s in enumerate(states):
            lat = x[i].float().cpu()
            if self.pixels is not None:
                frames = self.pixels.decode(s, lat)
            else:
                frames = self.decode(lat) if self.can_decode else torch.empty(0, dtype=torch.uint8)
            emb, query = self._embed(s, lat)
            chunks.append(Chunk(s.stream_id, s.next_chunk, s.next_chunk * f, lat, frames, emb, s.memory_chunks))
            s.next_chunk += 1
            if query is not None:
                s.memory_query = torch.from_numpy(np.asarray(query, dtype=np.float32).copy())
            if self.memory is not None:
                self._prefetch(s)
        return chunks

    def record_trace(
        self, states: Sequence[StreamState], step: int, x_t: torch.Tensor, sigma: float, x0: torch.Tensor
    ) -> None:
        """With ``self.trace`` set: ``x_t``/``sigma``/``x0`` of every stream's chunk at this denoising step.

        Keys are ``x_t.{stream}.{chunk}.{step}`` etc.; ``longroll generate --trace`` writes them for its
        one stream as ``x_t.{chunk}.{step}`` (see orchestrator/generate.py).
        """
        if self.trace is None:
            return
        for i, s in enumerate(states):
            key = f"{s.stream_id}.{s.next_chunk}.{step}"
            self.trace[f"x_t.{key}"] = x_t[i].float().cpu().clone()
            self.trace[f"sigma.{key}"] = torch.tensor(float(sigma))
            self.trace[f"x0.{key}"] = x0[i].float().cpu().clone()

    def _embed(self, state: StreamState, latents: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The chunk's retrieval key, and the query the stream's next chunk retrieves with.

        A stream with a moving camera is keyed by camera pose (the next chunk asks for the chunks whose
        camera stood nearest to where it will stand); any other stream by the embedder's content key,
        and it queries with its newest chunk's key (LongLive-RAG).
        """
        if self.embedder is None:
            return None, None
        keys = self.camera.pose_keys(state.spec, self._chunk_frames(state))
        if keys is not None:
            return keys
        emb = self.embedder.embed(latents)
        return emb, emb

    @property
    def can_decode(self) -> bool:
        """Chunks carry video frames: the tiny preset's latents are pixels; a Wan run decodes with its VAE."""
        return self.cfg.can_decode or self.pixels is not None

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
