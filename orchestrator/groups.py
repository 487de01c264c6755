"""Workers as generator groups, and direct stream moves: the orchestrator's side of both.

``spawn_worker`` starts one worker: a :class:`GeneratorWorker` when ``group_size`` is 1, else a
placement group of ``group_size`` bundles (STRICT_PACK: one node, so the ranks share a fast link) with
rank 0 (:class:`workers.group.GroupLeader`) in bundle 0; rank 0 starts the other ranks in the other
bundles. ``remove_worker`` removes the placement group, which kills every rank still alive.

``move_stream`` moves a stream directly (``export_streams`` on the source, the ObjectRef of its state
handed to ``import_streams`` on the destination): no checkpoint is written or read.
"""

from __future__ import annotations

import contextlib
import time

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group

from orchestrator.registry import NAMESPACE
from workers.messages import StreamAssignment, WorkerSettings

log = structlog.get_logger(__name__)

PLACEMENT_STRATEGY = "STRICT_PACK"  # every rank of a group on one node
CALL_TIMEOUT_S = 120.0

_groups: dict[str, object] = {}  # worker id -> its placement group


def spawn_worker(worker_id: str, settings: WorkerSettings, use_gpu: bool, worker_cpus: float):
    """Start a worker (a single GeneratorWorker or a group's rank 0); returns its actor handle."""
    from workers.worker import GeneratorWorker

    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": worker_cpus}
    opts = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": worker_cpus}
    if settings.group_size <= 1:
        return GeneratorWorker.options(**({"num_gpus": 1} if use_gpu else opts)).remote(worker_id, settings)
    from workers.group import GroupLeader

    pg = placement_group([dict(bundle) for _ in range(settings.group_size)], strategy=PLACEMENT_STRATEGY)
    _groups[worker_id] = pg
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    lead = dict(opts, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
    return GroupLeader.options(**lead).remote(worker_id, settings, pg, opts, NAMESPACE)


def remove_worker(worker_id: str) -> None:
    """Release what a lost or finished worker held beyond its actor (a group's placement group)."""
    pg = _groups.pop(worker_id, None)
    if pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)
        log.info("group.removed", worker_id=worker_id)


def move_stream(orch, src, dst, sid: str) -> bool:
    """Move ``sid`` from worker ``src`` to ``dst`` directly. Returns False if the stream is still on
    ``src`` (its export failed), for the caller to move it through a checkpoint instead.

    ``orch`` is the OrchestratorImpl: a worker that dies on the way is marked lost, and an import that
    fails falls back to ``assign`` on ``dst`` (which reloads the newest checkpoint).
    """
    t0 = time.perf_counter()
    try:
        handoffs = ray.get(src.handle.export_streams.remote([sid]), timeout=CALL_TIMEOUT_S)
    except (RayActorError, GetTimeoutError) as e:
        orch._lost(src, f"export failed: {type(e).__name__}")
        return True  # the stream went back to pending with the rest of src's streams
    except RayTaskError as e:
        orch._event("stream.move_fallback", stream_id=sid, src=src.id, dst=dst.id, stage="export", error=str(e)[-300:])
        return False
    src.streams.discard(sid)
    if not handoffs:
        # it finished in the step that was in flight: that step's report (from src, to which it stays
        # assigned) records it as done
        return True
    dst.streams.add(sid)
    orch.assigned[sid] = dst.id
    spec = StreamAssignment(orch.entries[sid].spec, orch.entries[sid].target_chunks)
    try:
        (a,) = ray.get(dst.handle.import_streams.remote(handoffs), timeout=CALL_TIMEOUT_S)
    except (RayActorError, GetTimeoutError) as e:
        orch._lost(dst, f"import failed: {type(e).__name__}")
        return True
    except RayTaskError as e:
        orch._event("stream.move_fallback", stream_id=sid, src=src.id, dst=dst.id, stage="import", error=str(e)[-300:])
        orch._collect_assignments([(sid, dst, dst.handle.assign.remote(spec))])
        return True
    orch.next_chunk[sid], orch.last_ckpt[sid] = a.start_chunk, a.checkpoint
    nbytes = sum(h.nbytes for h in handoffs)
    orch._event("stream.moved", stream_id=sid, src=src.id, dst=dst.id, how="direct", chunk_index=a.start_chunk,
                bytes=nbytes, seconds=round(time.perf_counter() - t0, 4))  # fmt: skip
    return True
