"""What the dashboard shows, read from a live Orchestrator (under its lock, from the server's threads)."""

from __future__ import annotations

import time

from orchestrator.telemetry import FPS_WINDOW_S
from workers.checkpoints import CheckpointStore

LOG_TAIL = 50  # log lines on a stream's page


class OrchestratorView:
    """Read-only snapshots of an ``OrchestratorImpl`` plus its ``control`` (the dashboard's only source)."""

    def __init__(self, orch):
        self.o = orch

    def has(self, sid: str) -> bool:
        return sid in self.o.entries

    def _summary(self, sid: str, now: float) -> dict:
        o = self.o
        tel, entry = o.telemetry[sid], o.entries[sid]
        last = tel.samples[-1] if tel.samples else None
        return {
            "id": sid,
            "state": o.state[sid],
            "next_chunk": o.next_chunk[sid],
            "target_chunks": entry.target_chunks,
            "frames": o.next_chunk[sid] * tel.frames_per_chunk if tel.frames_per_chunk else None,
            "worker_id": o.assigned.get(sid),
            "fps": round(tel.fps(now), 2) if o.state[sid] == "running" else 0.0,
            "step_ms": round(last.step_ms, 3) if last else None,
            "retrieval_ms": round(last.retrieval_ms, 3) if last and last.retrieval_ms is not None else None,
            "cache_bytes": tel.cache_bytes,
            "memory_rows": tel.memory_rows,
            "last_checkpoint": o.last_ckpt[sid],
            "checkpoint_age_s": round(now - tel.checkpoint_at, 1) if tel.checkpoint_at is not None else None,
            "preview_chunk": tel.latest_preview(),
        }

    def streams(self) -> list[dict]:
        now = time.time()
        with self.o.lock:
            return [self._summary(sid, now) for sid in self.o.entries]

    def stream(self, sid: str) -> dict | None:
        now = time.time()
        with self.o.lock:
            if sid not in self.o.entries:
                return None
            tel, spec = self.o.telemetry[sid], self.o.entries[sid].spec
            out = self._summary(sid, now)
            history, recent = [], []
            for s in tel.samples:  # frames/s at each sample: over the samples of the FPS window before it
                recent.append(s)
                while recent and s.time - recent[0].time > FPS_WINDOW_S:
                    recent.pop(0)
                span = s.time - recent[0].time
                fps = sum(x.frames for x in recent[1:]) / span if span > 0 else 0.0
                history.append(
                    {"time": s.time, "chunk": s.chunk, "fps": fps, "step_ms": s.step_ms, "retrieval_ms": s.retrieval_ms}
                )
            log = list(tel.log)[-LOG_TAIL:]
        ckpt_root = self.o.run.checkpoint_uri or str(self.o.run.stream_dir(sid).parent)
        try:
            checkpoints = CheckpointStore(ckpt_root, sid).chunks()
        except OSError:
            checkpoints = []
        return {
            **out,
            "seed": spec.seed,
            "prompt": spec.prompt,
            "history": history,
            "checkpoints": checkpoints,
            "log": log,
        }

    def preview(self, sid: str, chunk: int | None) -> tuple[int, bytes] | None:
        """The PNG of chunk ``chunk`` of the stream (newest when None), if it is still held."""
        with self.o.lock:
            tel = self.o.telemetry[sid]
            chunk = tel.latest_preview() if chunk is None else chunk
            png = tel.previews.get(chunk) if chunk is not None else None
        return (chunk, png) if png is not None else None

    def run(self) -> dict:
        now = time.time()
        p = self.o.progress()
        with self.o.lock:
            fps = sum(t.fps(now) for t in self.o.telemetry.values())
        states = [s.state for s in p.streams]
        return {
            "out_dir": self.o.run.out_dir,
            "state": p.state,
            "streams": len(states),
            "running": states.count("running"),
            "paused": states.count("paused"),
            "workers": [
                {
                    "id": w.worker_id,
                    "pid": w.pid,
                    "node_id": w.node_id,
                    "device": w.device,
                    "streams": list(w.stream_ids),
                }
                for w in p.workers
            ],
            "chunks": p.chunks,
            "frames": p.frames,
            "fps": round(fps, 2),
            "recoveries": len(p.recoveries),
            "error": p.error,
        }

    def control(self, sid: str, action: str, reason: str | None) -> str:
        if reason:
            with self.o.lock:
                self.o.telemetry[sid].add_log(f"request.{action}", {"reason": reason})
        return self.o.control(sid, action)
