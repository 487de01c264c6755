"""A generator group: N Ray actors in one placement group that form one torch.distributed process group
(NCCL on CUDA, gloo on CPU) and run one generator together (:mod:`workers.group_parallel`).

    orchestrator ──info/assign/release/step/export/import──▶ GroupLeader (rank 0, a GeneratorWorker)
    GroupLeader ──adopt/step/gather/forget (Ray calls)──▶ GroupRank 1..N-1 (created and owned by rank 0)
    all ranks ──collectives──▶ all ranks

Rank 0 is the only rank the orchestrator sees: it holds the streams, writes segments, memory rows and
checkpoints like any worker. Stream states it holds keep their bookkeeping but no cache (``cache=None``);
the cache lives sharded on the ranks, and is gathered into the single-process form for a checkpoint or a
migration, so a group and a single worker read each other's checkpoints.

Failure: a rank that dies makes the next collective fail (gloo sees the closed connection; a timeout
bounds the wait otherwise). Rank 0 then exits its own process, so the call in flight surfaces to the
orchestrator as an actor error: the worker is lost, its placement group is removed (which kills every
rank), and its streams resume from their checkpoints on other workers, as after any worker loss.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Sequence

import ray
import structlog
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ops.latent_cache import LatentKVCache
from workers.config import ModelConfig
from workers.group_parallel import Comm, GroupGenerator
from workers.logs import configure_logging
from workers.messages import WorkerSettings
from workers.models.tiny import cond_vector
from workers.state import StreamState
from workers.types import Chunk, StreamSpec
from workers.weights import resolve
from workers.worker import GeneratorWorkerImpl

log = structlog.get_logger(__name__)

COLLECTIVE_TIMEOUT_S = 60.0  # a collective waiting on a dead peer fails after this (gloo)
START_TIMEOUT_S = 120.0  # every rank must have joined the process group by then


class GroupRankLost(RuntimeError):
    """A rank of the group died or a collective failed: the group cannot continue and must be recreated."""


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def _init_process_group(rank: int, size: int, address: str, device: str) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip


def rank_name(worker_id: str, rank: int) -> str:
    """Ray actor name of rank >= 1 of a group (tests find a rank's pid through it)."""
    return f"group-{worker_id}-r{rank}"


class GroupRankImpl:
    """Ranks 1..N-1: their shard of every stream, driven by rank 0's calls."""

    def __init__(self, worker_id: str, rank: int, size: int, address: str, settings: WorkerSettings):
        configure_logging(settings.log_format, settings.log_level)
        torch.set_num_threads(settings.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        _init_process_group(rank, size, address, self.device)
        cfg = ModelConfig.from_dict(settings.model)
        self.gen = GroupGenerator(cfg, Comm(), self.device, weights=resolve(settings.weights, cfg))
        self.shards: dict[str, StreamState] = {}
        log.info("group.rank_start", worker_id=worker_id, rank=rank, size=size, pid=os.getpid())

    def pid(self) -> int:
        return os.getpid()

    def adopt(self, payload: bytes, meta: dict) -> None:
        state = StreamState.from_bytes(payload, meta, self.device)
        self.shards[state.stream_id] = self.gen.shard_state(state)

    def step(self, stream_ids: list[str]) -> None:
        self.gen.step([self.shards[sid] for sid in stream_ids])

    def gather(self, stream_id: str) -> None:
        self.gen.full_state(self.shards[stream_id])

    def forget(self, stream_id: str) -> None:
        self.shards.pop(stream_id, None)


@ray.remote(max_restarts=0, max_task_retries=0)
class GroupRank(GroupRankImpl):
    """Rank >= 1 of a generator group (created by rank 0, so it dies with it)."""


class GroupEngine:
    """Rank 0's generator: the :class:`workers.worker.GeneratorWorkerImpl` steps it like a Generator.

    It receives the worker's single-process stream states, shards them over the group on first use
    (``adopt``) and keeps only their bookkeeping in sync afterwards.
    """

    def __init__(self, cfg: ModelConfig, device: str, ranks: list, embedder=None, weights: str | None = None):
        self.cfg, self.device, self.ranks, self.embedder = cfg, device, ranks, embedder
        self.gen = GroupGenerator(cfg, Comm(), device, weights=weights)
        self.config_hash = self.gen.config_hash
        self.shards: dict[str, StreamState] = {}

    # ---- the Generator interface the worker uses ---------------------------------------------
    def new_stream(self, spec: StreamSpec) -> StreamState:
        cfg = self.cfg
        cache = LatentKVCache(cfg.cache_layout(), self.device)
        cond = cond_vector(spec.prompt, cfg.cond_dim)
        return StreamState(spec, self.config_hash, cond, cache, frames_per_chunk=cfg.frames_per_chunk)

    def check_state(self, state: StreamState) -> None:
        self.gen.check_state(state)

    @property
    def can_decode(self) -> bool:
        return self.gen.can_decode

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.gen.decode(latents)

    def step(self, states: Sequence[StreamState]) -> list[Chunk]:
        self._adopt(states)
        shards = [self.shards[s.stream_id] for s in states]
        chunks = self._all("step", ([s.stream_id for s in states],), lambda: self.gen.step(shards))
        for s, sh, c in zip(states, shards, chunks):
            s.next_chunk = sh.next_chunk
            if self.embedder is not None:
                c.embedding = self.embedder.embed(c.latents)
        return chunks

    def forget(self, stream_id: str) -> None:
        if self.shards.pop(stream_id, None) is not None:
            self._all("forget", (stream_id,), lambda: None)

    # ---- shards ------------------------------------------------------------------------------
    def materialize(self, state: StreamState) -> bool:
        """Give ``state`` its whole cache, gathered from the ranks. Returns False if it already had one."""
        if state.cache is not None:
            return False
        shard = self.shards[state.stream_id]
        state.cache = self._all("gather", (state.stream_id,), lambda: self.gen.full_state(shard)).cache
        return True

    def _adopt(self, states: Sequence[StreamState]) -> None:
        for s in states:
            if s.stream_id in self.shards:
                continue
            payload, meta = s.to_bytes()
            ref = ray.put(payload)
            self._all("adopt", (ref, meta), lambda s=s: self.shards.__setitem__(s.stream_id, self.gen.shard_state(s)))
            s.cache = None  # the ranks hold it now, sharded

    def _all(self, op: str, args: tuple, local: Callable):
        """Run ``op`` on every other rank and ``local`` here, concurrently (they meet in collectives).

        Raises:
            GroupRankLost: a rank died, a collective failed or timed out.
        """
        refs = [getattr(r, op).remote(*args) for r in self.ranks]
        err = None
        try:
            out = local()
        except Exception as e:  # noqa: BLE001 - classified below, once the other ranks have answered
            err = e
        try:
            ray.get(refs, timeout=COLLECTIVE_TIMEOUT_S + 30)
        except (RayActorError, GetTimeoutError) as e:
            raise GroupRankLost(f"{op}: a rank is gone: {type(e).__name__}") from e
        except RayTaskError as e:
            err = err or e
        if err is not None:
            if isinstance(err, dist.DistError) or isinstance(getattr(err, "cause", None), dist.DistError):
                raise GroupRankLost(f"{op}: collective failed: {err}") from err
            raise err
        return out


class GroupLeaderImpl(GeneratorWorkerImpl):
    """Rank 0 of a group: a GeneratorWorker whose generator spans ``settings.group_size`` ranks.

    Args:
        placement_group: the group's placement group (bundle r hosts rank r), or None to schedule the
            ranks anywhere (tests, benchmarks).
        rank_options: Ray options of ranks >= 1 (resources); ``namespace`` names them.
    """

    def __init__(self, worker_id: str, settings: WorkerSettings, placement_group=None,
                 rank_options: dict | None = None, namespace: str | None = None):  # fmt: skip
        if settings.stub:
            raise ValueError("a generator group needs the real generator (stub=False)")
        self._pg, self._rank_opts, self._namespace = placement_group, rank_options or {"num_cpus": 1}, namespace
        self.ranks: list = []
        super().__init__(worker_id, settings)

    def _make_generator(self, retriever, embedder) -> GroupEngine:
        size = self.s.group_size
        address = _free_address()
        for r in range(1, size):
            opts = dict(self._rank_opts, name=rank_name(self.worker_id, r))
            if self._namespace is not None:
                opts["namespace"] = self._namespace
            if self._pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r)
            self.ranks.append(GroupRank.options(**opts).remote(self.worker_id, r, size, address, self.s))
        _init_process_group(0, size, address, self.device)  # blocks until every rank has joined
        ray.get([r.pid.remote() for r in self.ranks], timeout=START_TIMEOUT_S)
        log.info("group.ready", worker_id=self.worker_id, size=size, address=address)
        return GroupEngine(self.cfg, self.device, self.ranks, embedder, weights=resolve(self.s.weights, self.cfg))

    def rank_pids(self) -> list[int]:
        """Process ids of every rank, rank 0 first."""
        return [os.getpid(), *ray.get([r.pid.remote() for r in self.ranks], timeout=30)]

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except GroupRankLost as e:
            # the group is broken: die, so the orchestrator sees an actor error, tears the whole group
            # down (placement group removed) and resumes the streams from their checkpoints
            log.error("group.rank_lost", worker_id=self.worker_id, error=str(e))
            with contextlib.suppress(Exception):
                self.shutdown()
            os._exit(1)

    def _checkpoint(self, h) -> None:
        made = self._guarded(self.gen.materialize, h.state)
        try:
            super()._checkpoint(h)
        finally:
            if made:
                h.state.cache = None

    def _stream_bytes(self, h) -> tuple[bytes, dict]:
        made = self._guarded(self.gen.materialize, h.state)
        try:
            return h.state.to_bytes()
        finally:
            if made:
                h.state.cache = None

    def release(self, stream_ids: list[str], state: str = "released"):
        for sid in stream_ids:  # whole caches first: the release checkpoints after dropping the shards
            if sid in self.streams:
                self._guarded(self.gen.materialize, self.streams[sid].state)
        return self._guarded(super().release, stream_ids, state)

    def step(self):
        return self._guarded(super().step)

    def export_streams(self, stream_ids: list[str]):
        return self._guarded(super().export_streams, stream_ids)


@ray.remote(max_restarts=0, max_task_retries=0)
class GroupLeader(GroupLeaderImpl):
    """Rank 0 of a generator group: what the orchestrator holds, with GeneratorWorker's methods."""
