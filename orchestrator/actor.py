"""The ``Orchestrator`` actor: stream registry, assignment, checkpoint schedule, health and recovery.

It is detached and named (one per output directory) and may be restarted by Ray at any time: its
constructor rebuilds the registry from ``run.json`` and the stream manifests and starts the control
loop in a thread. Workers it created die with it (Ray's ownership), and the new incarnation reloads
every unfinished stream from its newest valid checkpoint.

The control loop keeps one ``step`` call in flight per worker and waits on them with a timeout. A
step that raises an actor error (SIGKILLed process, lost node, restarting actor) marks the worker
lost: its streams go back to pending, are assigned to the least-loaded live workers, and reload from
their checkpoints; a replacement worker is started and, once ready, takes a fair share by moving
streams (each move checkpoints the stream first). Ray never retries a step on its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from orchestrator.faults import environment_fault
from orchestrator.groups import move_stream, remove_worker, spawn_worker
from orchestrator.metrics import RunMetrics
from orchestrator.registry import (
    FINAL_STATES,
    NAMESPACE,
    RunSpec,
    actor_name,
    clear_stops,
    pending_stops,
    request_stop,
)
from orchestrator.run_dir import append_event, repair_events, sweep_partial_files
from orchestrator.run_lock import Heartbeat, RunLocked, acquire, new_token, release
from orchestrator.telemetry import StreamTelemetry
from workers.messages import (
    Recovery,
    RunProgress,
    StepReport,
    StreamAssignment,
    StreamStatus,
    WorkerInfo,
)
from workers.output import write_json_atomic

log = structlog.get_logger(__name__)

STARTUP_WAIT_S = 60.0  # at start, wait this long for every worker before assigning (avoids moves)
NODE_CHECK_S = 1.0  # how often node membership is checked
CALL_TIMEOUT_S = 120.0  # assign / release calls
MAX_STEP_FAILURES = 3  # a stream whose worker died or whose step raised this many times in a row fails
MAX_START_FAILURES = 3  # workers that fail to start this many times in a row end the run
MAX_LOOP_ERRORS = 5  # control-loop errors in a row that end the run
CONTROL_TIMEOUT_S = 60.0  # how long a pause/resume/stop request waits to be carried out
GAUGE_EVERY_S = 1.0  # how often state and checkpoint-age gauges are refreshed


class ControlError(ValueError):
    """A pause/resume/stop that the stream's state does not allow (HTTP 409)."""


@dataclass
class _Control:
    stream_id: str
    action: str  # pause | resume
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Worker:
    id: str
    handle: object
    ready_ref: object | None  # pending info() call while starting
    info: WorkerInfo | None = None
    streams: set[str] = field(default_factory=set)
    inflight: object | None = None  # ObjectRef of the step in flight
    inflight_at: float = 0.0  # time.monotonic() when it was sent


class OrchestratorImpl:
    def __init__(self, out_dir: str, poll_s: float = 0.5, start_loop: bool = True, lock_token: str | None = None):
        self.run = RunSpec.load(out_dir)
        self.fatal: str | None = None  # set once: the run ends failed with this error (driver: exit 1)
        self._holds_lock = False
        self._take_lock(lock_token or new_token())
        self.settings = self.run.worker_settings()
        self.poll_s = poll_s
        self.lock = threading.RLock()
        self.entries = {e.spec.stream_id: e for e in self.run.streams}
        self.state: dict[str, str] = {}
        self.next_chunk: dict[str, int] = {}
        self.last_ckpt: dict[str, int | None] = {}
        for sid in self.entries:
            m = self.run.manifest(sid) or {}
            st = m.get("state", "pending")
            self.state[sid] = st if st in FINAL_STATES or st == "paused" else "pending"
            self.next_chunk[sid] = int(m.get("chunks_done", 0))
            self.last_ckpt[sid] = m.get("last_checkpoint")
        self.assigned: dict[str, str] = {}
        self.workers: dict[str, _Worker] = {}
        self.incarnation = uuid.uuid4().hex[:6]
        self._n_spawned = 0
        self._startup_until = time.monotonic() + STARTUP_WAIT_S
        self._started = False
        self.recoveries: list[Recovery] = []
        self._awaiting: dict[str, int] = {}  # stream -> index into recoveries
        self._failures: dict[str, int] = {}  # stream -> worker deaths / raising steps in a row (this incarnation)
        self._failed_at: dict[str, int] = {}  # stream -> the chunk it was at when it last failed
        self._last_error: dict[str, str] = {}  # stream -> its last failure
        self._start_failures = 0  # workers in a row that failed to start
        self._loop_errors = 0
        self._last_progress = time.monotonic()  # a chunk, an assignment or a worker coming up (stall check)
        self.chunks = self.frames = 0
        self.control_s = 0.0
        self.started_at = time.time()
        self.error: str | None = None
        self.finished = False
        self._next_node_check = 0.0
        self._controls: list[_Control] = []  # pause/resume requests, carried out by the loop
        self.telemetry = {sid: StreamTelemetry() for sid in self.entries}
        for sid, ckpt in self.last_ckpt.items():
            self.telemetry[sid].saw_checkpoint(ckpt, self._manifest_time(sid))
        self.metrics = RunMetrics(Path(self.run.out_dir).name)
        self._next_gauges = 0.0
        self.dashboard = None
        self._use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self._event(
            "orchestrator.start", incarnation=self.incarnation, pending=sum(s == "pending" for s in self.state.values())
        )
        self._thread = None
        if self.run.dashboard_port is not None and self.fatal is None:
            self._start_dashboard()
        if start_loop:
            self._thread = threading.Thread(target=self._loop, name="orchestrator-loop", daemon=True)
            self._thread.start()

    # ---- queries (called from other actor threads) -----------------------------------------
    def progress(self) -> RunProgress:
        with self.lock:
            streams = tuple(
                StreamStatus(
                    sid,
                    self.state[sid],
                    self.next_chunk[sid],
                    e.target_chunks,
                    self.assigned.get(sid),
                    self.last_ckpt[sid],
                )
                for sid, e in self.entries.items()
            )
            workers = tuple(
                replace(w.info, stream_ids=tuple(sorted(w.streams)))
                for w in self.workers.values()
                if w.info is not None
            )
            state = self.run.state if self.finished else "running" if self._started else "starting"
            return RunProgress(
                state,
                streams,
                workers,
                self.chunks,
                self.frames,
                self.started_at,
                self.control_s,
                tuple(self.recoveries),
                self.error,
                self.dashboard.url if self.dashboard is not None else None,
                self.run.error if self.finished else self.fatal,
            )

    def stop(self, stream_ids: list[str] | None = None) -> None:
        request_stop(self.run.out_dir, stream_ids)

    def control(self, stream_id: str, action: str, timeout: float = CONTROL_TIMEOUT_S) -> str:
        """Pause, resume or stop one stream and wait until it is done; returns the stream's new state.

        A paused stream is checkpointed and released by its worker (it holds no resources) and stays
        paused across orchestrator restarts; resuming reloads it from that checkpoint, so it goes on
        with the frames it would have produced uninterrupted. Stopped or failed streams may be resumed
        while the run lives. Raises KeyError (unknown stream), ControlError (not allowed in its
        state), TimeoutError.
        """
        if action not in ("pause", "resume", "stop"):
            raise ValueError(f"unknown action {action!r}")
        with self.lock:
            st = self.state[stream_id]  # KeyError: unknown stream
            already = {"pause": ("paused",), "resume": ("pending", "running"), "stop": ("stopped",)}[action]
            allowed = {"pause": ("pending", "running"), "resume": ("paused", "stopped", "failed")}
            if st in already:
                return st  # idempotent
            if st in ("done", "failed") if action == "stop" else st not in allowed[action]:
                raise ControlError(f"cannot {action} stream {stream_id}: it is {st}")
            if self.finished:
                raise ControlError(f"cannot {action} stream {stream_id}: the run is {self.run.state}")
            req = None
            if action != "stop":
                req = _Control(stream_id, action)
                self._controls.append(req)
        if action == "stop":
            request_stop(self.run.out_dir, [stream_id])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self.lock:
                    if self.state[stream_id] in FINAL_STATES:
                        return self.state[stream_id]
                time.sleep(0.05)
            raise TimeoutError(f"stream {stream_id} did not stop within {timeout:.0f} s")
        if not req.done.wait(timeout):
            raise TimeoutError(f"stream {stream_id} did not {action} within {timeout:.0f} s")
        with self.lock:
            return self.state[stream_id]

    def ping(self) -> str:
        return self.incarnation

    # ---- events ------------------------------------------------------------------------------
    def _event(self, name: str, **kw) -> None:
        """structlog + a durable line in DIR/events.jsonl (what `status` and tests read)."""
        log.info(name, **kw)
        sid = kw.get("stream_id")
        if sid in getattr(self, "telemetry", {}):
            self.telemetry[sid].add_log(name, {k: v for k, v in kw.items() if k != "stream_id"})
        if self._holds_lock:  # another run's directory is not ours to write
            with contextlib.suppress(OSError):
                append_event(self.run.out_dir, {"event": name, "time": time.time(), **kw})

    # ---- the run lock and fatal errors ------------------------------------------------------------
    def _take_lock(self, token: str) -> None:
        """Hold DIR/run.lock (or end at once: another live run owns the directory), then clean up."""
        self.lock_token, self._heartbeat = token, None
        try:
            taken = acquire(self.run.out_dir, token, "orchestrator")
        except (RunLocked, OSError) as e:
            self.fatal = str(e)
            log.error("run.locked", error=self.fatal)
            return
        self._holds_lock = True
        self._heartbeat = Heartbeat(self.run.out_dir, token, on_lost=self._lock_lost).start()
        repaired = repair_events(self.run.out_dir)
        swept = sweep_partial_files(self.run.out_dir)
        if taken is not None or repaired or swept:
            self._event(
                "run.lock_taken",
                stale=taken.describe() if taken is not None else None,
                events_line_cut=repaired,
                partial_files_removed=[str(p.relative_to(self.run.out_dir)) for p in swept],
            )

    def _lock_lost(self, why: str) -> None:
        self._holds_lock = False
        self._fail(why)

    def _fail(self, error: str) -> None:
        """Record a fatal error: the loop stops the run (failed) and the driver prints it, exit 1."""
        if self.fatal is None:
            self.fatal = error
            self._event("run.fatal", error=error)

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.finished:
            try:
                self._tick()
                self._loop_errors = 0
            except Exception as e:  # noqa: BLE001 - keep orchestrating a while; the error is in progress()
                self.error = f"{type(e).__name__}: {e}"
                log.exception("orchestrator.loop_error")
                self._loop_errors += 1
                fault = environment_fault(e)
                if fault is not None or self._loop_errors >= MAX_LOOP_ERRORS:
                    self._fail(f"orchestrator: {fault or self.error}")
                    with contextlib.suppress(Exception):
                        self._finish()
                    self.finished = True
                time.sleep(1.0)

    def _tick(self) -> None:
        t0 = time.perf_counter()
        with self.lock:
            if self.fatal is not None:
                self._finish()
                return
            self._ensure_workers()
            self._check_nodes()
            self._handle_stops()
            self._handle_controls()
            self._assign_pending()
            self._refresh_gauges()
            self._check_stall()
            if self._all_final():
                self._finish()
                return
            refs = {}
            for w in self.workers.values():
                if w.info is not None and w.streams and w.inflight is None:
                    w.inflight, w.inflight_at = w.handle.step.remote(), time.monotonic()
                if w.inflight is not None:
                    refs[w.inflight] = w
            waiting = [w.ready_ref for w in self.workers.values() if w.ready_ref is not None]
        self.control_s += time.perf_counter() - t0
        if not refs and not waiting:
            time.sleep(self.poll_s / 5)
            return
        ready, _ = ray.wait(list(refs) + waiting, num_returns=1, timeout=self.poll_s)
        t0 = time.perf_counter()
        with self.lock:
            done = [r for r in refs if r in set(ready)]
            if done:  # also collect every other step that has finished meanwhile
                more, _ = ray.wait([r for r in refs if r not in done], num_returns=len(refs) - len(done), timeout=0)
                done += more
            for ref in done:
                w = refs[ref]
                w.inflight = None
                try:
                    report = ray.get(ref)
                except RayActorError as e:
                    self._lost(w, f"{type(e).__name__}")
                    continue
                except RayTaskError as e:  # the step raised: same path as a death, bounded retries
                    self._step_failed(w, e)
                    continue
                self._on_report(w, report)
        self.control_s += time.perf_counter() - t0

    # ---- workers -----------------------------------------------------------------------------
    def _ensure_workers(self) -> None:
        while len(self.workers) < self.run.workers:
            wid = f"{self.incarnation}-w{self._n_spawned}"
            self._n_spawned += 1
            handle = spawn_worker(wid, self.settings, self._use_gpu, self.run.worker_cpus)
            self.workers[wid] = _Worker(wid, handle, handle.info.remote())
            self._event("worker.spawn", worker_id=wid)
        for w in list(self.workers.values()):
            if w.ready_ref is None:
                continue
            ready, _ = ray.wait([w.ready_ref], timeout=0)
            if not ready:
                continue
            try:
                w.info = ray.get(w.ready_ref)
            except RayError as e:
                self._event("worker.start_failed", worker_id=w.id, error=str(e)[-800:])
                self.workers.pop(w.id)
                remove_worker(w.id)
                self._start_failures += 1
                fault = environment_fault(e)
                if fault is not None or self._start_failures >= MAX_START_FAILURES:
                    why = fault or _last_line(e)
                    self._fail(f"workers fail to start ({self._start_failures} in a row): {why}")
                    return
                time.sleep(1.0)
                continue
            w.ready_ref = None
            self._start_failures = 0
            self._last_progress = time.monotonic()
            self._event("worker.ready", worker_id=w.id, pid=w.info.pid, node_id=w.info.node_id)
            if self._started:
                self._rebalance(w)

    def _check_nodes(self) -> None:
        now = time.monotonic()
        if now < self._next_node_check:
            return
        self._next_node_check = now + NODE_CHECK_S
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for w in list(self.workers.values()):
            if w.info is not None and w.info.node_id and w.info.node_id not in alive:
                self._lost(w, "node lost")

    def _lost(self, w: _Worker, reason: str, error: str | None = None) -> None:
        if self.workers.pop(w.id, None) is None:
            return
        with contextlib.suppress(Exception):
            ray.kill(w.handle, no_restart=True)
        remove_worker(w.id)  # a group: every rank goes with its placement group
        streams = tuple(sorted(w.streams))
        node = w.info.node_id if w.info else ""
        rec = Recovery(w.id, node, reason, time.time(), streams, None)
        self.recoveries.append(rec)
        idx = len(self.recoveries) - 1
        for sid in streams:
            self.assigned.pop(sid, None)
            if self.state[sid] == "running":
                self.state[sid] = "pending"
                self._awaiting[sid] = idx
        self._event("worker.lost", worker_id=w.id, node_id=node, reason=reason, streams=list(streams))
        self.metrics.on_recovery(reason.split(":")[0])
        for sid in streams:
            self._count_failure(sid, f"worker {w.id}: {reason}" if error is None else error)

    def _step_failed(self, w: _Worker, err: Exception) -> None:
        """A step raised. A fault of the environment (disk full, permission) ends the run; otherwise the
        worker is replaced and its streams reload from their checkpoints, as after a crash."""
        streams = sorted(w.streams)
        self._event("worker.step_failed", worker_id=w.id, streams=streams, error=str(err)[-800:])
        fault = environment_fault(err)
        if fault is not None:
            self._fail(f"worker {w.id} on streams {streams}: {fault}")
        self._lost(w, "step failed", error=_last_line(err))

    def _count_failure(self, sid: str, error: str) -> None:
        """One more failure of ``sid`` where it failed last time (worker death, raising step or assign);
        after MAX_STEP_FAILURES in a row the stream is failed: a deterministic fault would rerun forever."""
        at = self.next_chunk.get(sid, 0)
        if self._failed_at.get(sid) != at:
            self._failures[sid] = 0  # it got past where it failed before: a new series
        self._failed_at[sid], self._last_error[sid] = at, error
        self._failures[sid] = self._failures.get(sid, 0) + 1
        if self._failures[sid] >= MAX_STEP_FAILURES and self.state[sid] == "pending":
            self.state[sid] = "failed"
            self._awaiting.pop(sid, None)
            with contextlib.suppress(OSError):
                self._mark_manifest(sid, "failed")
            self._event("stream.failed", stream_id=sid, chunk_index=at, failures=self._failures[sid], error=error)

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.info is not None]

    def _has_capacity(self, w: _Worker) -> bool:
        """Room for one more stream: the run's --streams-per-worker and what the worker's memory holds."""
        caps = [self.run.streams_per_worker, w.info.capacity if w.info is not None else None]
        return all(cap is None or len(w.streams) < cap for cap in caps)

    # ---- streams -----------------------------------------------------------------------------
    def _assign_pending(self) -> None:
        pending = [sid for sid, st in self.state.items() if st == "pending"]
        if not pending:
            self._started = True
            return
        starting = any(w.info is None for w in self.workers.values())
        if not self._started and starting and time.monotonic() < self._startup_until:
            return  # first assignment: wait for every worker, so no stream has to move right away
        ready = self._live()
        if ready and not starting and all(w.info.capacity == 0 for w in ready):
            self._fail(f"no worker's memory holds a stream (devices: {sorted({w.info.device for w in ready})}); "
                       "`longroll plan` sizes one")  # fmt: skip
            return
        calls = []
        for sid in pending:
            live = [w for w in self._live() if self._has_capacity(w)]
            if not live:
                break
            w = min(live, key=lambda w: (len(w.streams), w.id))
            e = self.entries[sid]
            w.streams.add(sid)
            self.assigned[sid] = w.id
            self.state[sid] = "running"
            calls.append((sid, w, w.handle.assign.remote(StreamAssignment(e.spec, e.target_chunks))))
        self._started = self._started or bool(calls)
        self._collect_assignments(calls)

    def _collect_assignments(self, calls) -> None:
        for sid, w, ref in calls:
            try:
                a = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as e:
                self._lost(w, f"assign failed: {type(e).__name__}")
                continue
            except RayTaskError as e:  # assign raised: the worker is fine, the stream is not
                w.streams.discard(sid)
                self.assigned.pop(sid, None)
                self.state[sid] = "pending"
                self._event("stream.assign_failed", stream_id=sid, worker_id=w.id, error=str(e)[-800:])
                fault = environment_fault(e)
                if fault is not None:
                    self._fail(f"assigning stream {sid}: {fault}")
                self._count_failure(sid, f"assign: {_last_line(e)}")
                continue
            self.next_chunk[sid], self.last_ckpt[sid] = a.start_chunk, a.checkpoint
            self._last_progress = time.monotonic()
            if a.skipped:
                self._event("checkpoint.fallback", stream_id=sid, chunk_index=a.checkpoint, skipped=list(a.skipped))
            self._event(
                "stream.assigned", stream_id=sid, worker_id=w.id, chunk_index=a.start_chunk, checkpoint=a.checkpoint
            )
            if a.done:  # found at its target (its final checkpoint was saved, its manifest not yet)
                self.state[sid] = "done"
                self.assigned.pop(sid, None)
                w.streams.discard(sid)
                self._event("stream.done", stream_id=sid, chunk_index=a.start_chunk - 1, found_at_target=True)

    def _rebalance(self, new: _Worker) -> None:
        """A worker joined: move streams to it from the most loaded workers until loads differ by <= 1."""
        while self._has_capacity(new):
            src = max(self._live(), key=lambda w: len(w.streams))
            if src is new or len(src.streams) - len(new.streams) <= 1:
                return
            sid = sorted(src.streams)[-1]
            if move_stream(self, src, new, sid):  # directly; False: export failed, move via a checkpoint
                continue
            try:
                ray.get(src.handle.release.remote([sid]), timeout=CALL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as e:
                self._lost(src, f"release failed: {type(e).__name__}")
                continue
            src.streams.discard(sid)
            self._event("stream.moved", stream_id=sid, src=src.id, dst=new.id)
            new.streams.add(sid)
            self.assigned[sid] = new.id
            self._collect_assignments(
                [
                    (
                        sid,
                        new,
                        new.handle.assign.remote(
                            StreamAssignment(self.entries[sid].spec, self.entries[sid].target_chunks)
                        ),
                    )
                ]
            )

    def _on_report(self, w: _Worker, r: StepReport) -> None:
        self.chunks += r.chunks
        self.frames += r.frames
        now = time.time()
        if r.chunks:
            self._last_progress = time.monotonic()
        for p in r.streams:
            sid = p.stream_id
            if self.assigned.get(sid) != w.id:
                continue  # moved or stopped meanwhile
            self.next_chunk[sid], self.last_ckpt[sid] = p.next_chunk, p.last_checkpoint
            self.telemetry[sid].on_progress(p, r.seconds, now)
            if sid in self._awaiting:
                idx = self._awaiting.pop(sid)
                rec = self.recoveries[idx]
                if not any(self._awaiting.get(s) == idx for s in rec.streams):
                    self.recoveries[idx] = replace(rec, resumed_at=time.time())
                    self._event("recovery.done", worker_id=rec.worker_id, seconds=time.time() - rec.lost_at)
            if p.state == "done":
                self.state[sid] = "done"
                self.assigned.pop(sid, None)
                w.streams.discard(sid)
                self._event("stream.done", stream_id=sid, chunk_index=p.next_chunk - 1)
        self.metrics.on_report(r, {p.stream_id: self.telemetry[p.stream_id].fps(now) for p in r.streams})

    def _handle_stops(self) -> None:
        stops = pending_stops(self.run.out_dir)
        if stops is not None and not stops:
            return
        targets = [s for s in self.entries if (stops is None or s in stops) and self.state[s] not in FINAL_STATES]
        self._release_streams(targets, "stopped")
        for sid in targets:
            self._awaiting.pop(sid, None)
            self._event("stream.stopped", stream_id=sid)
        clear_stops(self.run.out_dir, None if stops is None else sorted(stops))

    def _handle_controls(self) -> None:
        """Carry out pause/resume requests (see :meth:`control`)."""
        requests, self._controls = self._controls, []
        pause = [
            r.stream_id for r in requests if r.action == "pause" and self.state[r.stream_id] in ("pending", "running")
        ]
        self._release_streams(pause, "paused")
        for sid in pause:
            self._awaiting.pop(sid, None)
            self._event("stream.paused", stream_id=sid, chunk_index=self.next_chunk[sid])
        for r in requests:
            sid = r.stream_id
            if r.action == "resume" and self.state[sid] in ("paused", "stopped", "failed"):
                self.state[sid] = "pending"
                self._failures.pop(sid, None)
                self._event("stream.resumed", stream_id=sid, chunk_index=self.next_chunk[sid])
            r.done.set()

    def _release_streams(self, stream_ids: list[str], state: str) -> None:
        """Checkpoint and drop streams from their workers and put them in ``state`` (stopped | paused)."""
        by_worker: dict[str, list[str]] = {}
        for sid in stream_ids:
            wid = self.assigned.get(sid)
            if wid is None:
                self._mark_manifest(sid, state)
                self.state[sid] = state
            else:
                by_worker.setdefault(wid, []).append(sid)
        for wid, sids in by_worker.items():
            w = self.workers[wid]
            try:
                released = ray.get(w.handle.release.remote(sids, state), timeout=CALL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as e:
                self._lost(w, f"release failed: {type(e).__name__}")
                for sid in sids:  # their checkpoints are whatever was last written
                    self._mark_manifest(sid, state)
                    self.state[sid] = state
                continue
            for p in released:
                self.next_chunk[p.stream_id], self.last_ckpt[p.stream_id] = p.next_chunk, p.last_checkpoint
                self.telemetry[p.stream_id].saw_checkpoint(p.last_checkpoint)
            for sid in sids:
                w.streams.discard(sid)
                self.assigned.pop(sid, None)
                self.state[sid] = state

    def _start_dashboard(self) -> None:
        from orchestrator.dashboard.server import start_dashboard

        # a restarted orchestrator asks for the port its previous incarnation had
        try:
            self.dashboard = start_dashboard(self, self.run.dashboard_host, self.run.dashboard_port)
        except Exception as e:  # noqa: BLE001 - the run goes on without its dashboard
            self.error = f"dashboard: {type(e).__name__}: {e}"
            log.exception("dashboard.failed")
            return
        self._event("dashboard.start", url=self.dashboard.url)

    def _refresh_gauges(self) -> None:
        now = time.monotonic()
        if now < self._next_gauges:
            return
        self._next_gauges = now + GAUGE_EVERY_S
        t = time.time()
        ages = {sid: t - tel.checkpoint_at for sid, tel in self.telemetry.items() if tel.checkpoint_at is not None}
        self.metrics.on_states(self.state, ages)

    def _manifest_time(self, sid: str) -> float | None:
        with contextlib.suppress(OSError):
            return (self.run.stream_dir(sid) / "manifest.json").stat().st_mtime
        return None

    def _mark_manifest(self, sid: str, state: str) -> None:
        m = self.run.manifest(sid)
        if m is not None:
            m["state"] = state
            write_json_atomic(self.run.stream_dir(sid) / "manifest.json", m)

    def _all_final(self) -> bool:
        return all(st in FINAL_STATES for st in self.state.values())

    def _check_stall(self) -> None:
        """A silent hang ends the run: a step that has not returned for stall_timeout_s, or no chunk,
        assignment or worker start for that long while streams wait."""
        now, limit = time.monotonic(), self.run.stall_timeout_s
        for w in self.workers.values():
            if w.inflight is not None and now - w.inflight_at > limit:
                busy = now - w.inflight_at
                streams = sorted(w.streams)
                self._fail(
                    f"worker {w.id}: a step on streams {streams} has not returned for {busy:.0f} s (stall timeout)"
                )
                return
        if not any(st in ("pending", "running") for st in self.state.values()):
            self._last_progress = time.monotonic()  # nothing asked to run (every stream paused)
            return
        idle = time.monotonic() - self._last_progress
        if idle > self.run.stall_timeout_s:
            waiting = sorted(s for s, st in self.state.items() if st in ("pending", "running"))
            self._fail(
                f"no progress for {idle:.0f} s (--stall-timeout {self.run.stall_timeout_s:g}); waiting: {waiting}"
            )

    def _run_error(self) -> str | None:
        if self.fatal is not None:
            return self.fatal
        failed = sorted(s for s, st in self.state.items() if st == "failed")
        if not failed:
            return None
        last = "; ".join(f"{s}: {self._last_error[s]}" for s in failed if s in self._last_error)
        return f"streams {failed} failed" + (f" ({last})" if last else "")

    def _finish(self) -> None:
        """End the run: every worker shut down, run.json's state written, temporaries removed, lock freed.
        Bounded: each step has a timeout, and a failing write is reported, never retried forever."""
        if self.fatal is not None:
            for sid, st in self.state.items():
                if st not in FINAL_STATES:
                    self.state[sid] = "failed"
                    if self._holds_lock:
                        with contextlib.suppress(OSError):
                            self._mark_manifest(sid, "failed")
        states = set(self.state.values())
        self.run.state = "done" if states == {"done"} else "failed" if "failed" in states else "stopped"
        for w in self.workers.values():
            if self.fatal is None:  # a failing run's workers may be hung or failing: no graceful shutdown
                with contextlib.suppress(Exception):
                    ray.get(w.handle.shutdown.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(w.handle, no_restart=True)
            remove_worker(w.id)
        self.workers.clear()
        self.run.error = self._run_error()
        if self._holds_lock:
            with contextlib.suppress(OSError):  # first: on a full disk this frees what run.json needs
                sweep_partial_files(self.run.out_dir)
            try:
                self.run.save()
            except OSError as e:
                self.run.state = "failed"
                self.run.error = self.run.error or f"cannot write {self.run.path}: {e}"
            self._event("run.finished", state=self.run.state, chunks=self.chunks, error=self.run.error)
            if self._heartbeat is not None:
                self._heartbeat.stop()
            with contextlib.suppress(OSError):
                release(self.run.out_dir, self.lock_token)
            self._holds_lock = False
        self.finished = True


def _last_line(err: BaseException) -> str:
    """The exception line of an error (a RayTaskError's text is its remote traceback)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[-300:]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=8)
class Orchestrator(OrchestratorImpl):
    """Detached, named actor; create with :func:`start_orchestrator`."""


def start_orchestrator(out_dir: str, lock_token: str | None = None):
    """Get this output directory's Orchestrator actor, creating it (detached, restartable) if absent.

    ``lock_token``: the token of DIR/run.lock the caller holds (the driver), adopted by the actor; a new
    one when None. Ray restarts the actor with the same token, so a restarted incarnation keeps the lock.
    """
    return Orchestrator.options(
        name=actor_name(out_dir), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(str(Path(out_dir).resolve()), lock_token=lock_token or new_token())
