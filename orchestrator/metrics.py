"""Run metrics through ``ray.util.metrics``: they show in Ray's dashboard and on its Prometheus endpoint.

Recorded by the Orchestrator actor from the workers' step reports, tagged by stream and worker. Ray
exports them from the node's metrics agent (``ray start --metrics-export-port=P`` fixes the port;
Prometheus then scrapes ``http://NODE:P/metrics``). Ray prefixes application metrics with ``ray_``.
"""

from __future__ import annotations

import contextlib

import structlog

from workers.messages import StepReport

log = structlog.get_logger(__name__)

STEP_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RETRIEVAL_BOUNDARIES_MS = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0]
STATES = ("pending", "running", "paused", "done", "stopped", "failed")


class RunMetrics:
    """All of a run's metrics. Outside a Ray worker process every call is a no-op."""

    def __init__(self, run_name: str):
        self.run = run_name
        self.enabled = False
        try:
            from ray.util import metrics as m

            sw = ("run", "stream_id", "worker_id")
            s = ("run", "stream_id")
            self.chunks = m.Counter("longroll_chunks", "chunks generated", tag_keys=sw)
            self.frames = m.Counter("longroll_frames", "video frames generated", tag_keys=sw)
            self.step_s = m.Histogram(
                "longroll_step_seconds", "wall time of a worker's batched step", STEP_BOUNDARIES_S, ("run", "worker_id")
            )
            self.retrieval_ms = m.Histogram(
                "longroll_retrieval_ms", "time a step waited for memory retrieval", RETRIEVAL_BOUNDARIES_MS, sw
            )
            self.fps = m.Gauge("longroll_stream_fps", "frames per second of a stream (recent)", tag_keys=sw)
            self.cache_bytes = m.Gauge("longroll_cache_bytes", "bytes of a stream's latent KV cache", tag_keys=s)
            self.memory_rows = m.Gauge("longroll_memory_rows", "chunks of a stream in the memory store", tag_keys=s)
            self.ckpt_age = m.Gauge("longroll_checkpoint_age_seconds", "time since a stream's checkpoint", tag_keys=s)
            self.next_chunk = m.Gauge("longroll_stream_chunks", "chunks a stream has generated", tag_keys=s)
            self.streams = m.Gauge("longroll_streams", "streams by state", tag_keys=("run", "state"))
            self.recoveries = m.Counter("longroll_recoveries", "workers lost and replaced", tag_keys=("run", "reason"))
            self.enabled = True
        except Exception as e:  # noqa: BLE001 - metrics must never stop a run
            log.warning("metrics.disabled", error=f"{type(e).__name__}: {e}")

    def _safe(self, fn, *args, **kw) -> None:
        if self.enabled:
            with contextlib.suppress(Exception):
                fn(*args, **kw)

    def on_report(self, r: StepReport, fps: dict[str, float]) -> None:
        self._safe(self.step_s.observe, r.seconds, tags={"run": self.run, "worker_id": r.worker_id})
        for p in r.streams:
            sw = {"run": self.run, "stream_id": p.stream_id, "worker_id": r.worker_id}
            s = {"run": self.run, "stream_id": p.stream_id}
            self._safe(self.chunks.inc, 1, tags=sw)
            if p.frames:
                self._safe(self.frames.inc, p.frames, tags=sw)
            self._safe(self.fps.set, fps.get(p.stream_id, 0.0), tags=sw)
            self._safe(self.cache_bytes.set, p.cache_bytes, tags=s)
            self._safe(self.next_chunk.set, p.next_chunk, tags=s)
            if p.retrieval_ms is not None:
                self._safe(self.retrieval_ms.observe, p.retrieval_ms, tags=sw)
            if p.memory_rows is not None:
                self._safe(self.memory_rows.set, p.memory_rows, tags=s)

    def on_states(self, states: dict[str, str], checkpoint_age: dict[str, float]) -> None:
        for st in STATES:
            self._safe(self.streams.set, sum(v == st for v in states.values()), tags={"run": self.run, "state": st})
        for sid, age in checkpoint_age.items():
            self._safe(self.ckpt_age.set, age, tags={"run": self.run, "stream_id": sid})

    def on_recovery(self, reason: str) -> None:
        self._safe(self.recoveries.inc, 1, tags={"run": self.run, "reason": reason})
