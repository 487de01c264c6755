"""``GeneratorWorker``: the Ray actor that hosts one Generator and steps several streams batched.

The worker keeps no state that matters across its own death: everything it needs to continue a
stream is in the stream's newest checkpoint, and everything it writes is keyed by (stream_id,
chunk_index) (segment files by chunk range, memory-store rows by primary key, checkpoints by chunk),
so regenerating a chunk replaces rather than duplicates. The orchestrator decides what reruns.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import structlog
import torch

from workers.checkpoints import CheckpointStore
from workers.config import ModelConfig
from workers.failpoints import failpoint
from workers.logs import configure_logging
from workers.messages import Assigned, StepReport, StreamAssignment, StreamProgress, WorkerInfo, WorkerSettings
from workers.migration import StreamMigration
from workers.output import StreamOutput
from workers.preview import preview_png
from workers.state import StreamState
from workers.types import Chunk

log = structlog.get_logger(__name__)


class StubGenerator:
    """Benchmarks and tests of the control plane: chunks of 1 tiny frame, no model.

    Failure injection for tests of the orchestrator's error paths, by prompt: ``raise-at:N`` makes the
    step that would produce chunk N raise, ``die-at:N`` kills the worker process there (SIGKILL), and
    ``hang-at:N`` blocks it for ever (a silent hang).
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.config_hash = cfg, cfg.config_hash()

    def new_stream(self, spec) -> StreamState:
        return StreamState(spec, self.config_hash, torch.zeros(1), cache=None, frames_per_chunk=1)

    def step(self, states) -> list[Chunk]:
        out = []
        for s in states:
            if s.spec.prompt == f"raise-at:{s.next_chunk}":
                raise RuntimeError(f"injected failure: {s.stream_id} chunk {s.next_chunk}")
            if s.spec.prompt == f"die-at:{s.next_chunk}":
                os.kill(os.getpid(), signal.SIGKILL)
            if s.spec.prompt == f"hang-at:{s.next_chunk}":
                threading.Event().wait()
            frames = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
            out.append(Chunk(s.stream_id, s.next_chunk, s.next_chunk, torch.zeros(1), frames))
            s.next_chunk += 1
        return out


@dataclass
class _Held:
    assignment: StreamAssignment
    state: StreamState
    output: StreamOutput | None
    checkpoints: CheckpointStore | None
    last_checkpoint: int | None
    preview_at: float = 0.0  # time.monotonic() of the last preview sent
    pending: tuple | None = None  # (chunk, ObjectRef of its frames): decoded by the pool, written next step


class GeneratorWorkerImpl(StreamMigration):
    """The actor's body (plain class so tests and benchmarks can also run it in-process)."""

    def __init__(self, worker_id: str, settings: WorkerSettings):
        configure_logging(settings.log_format, settings.log_level)
        torch.set_num_threads(settings.threads)
        self.worker_id, self.s = worker_id, settings
        self.cfg = ModelConfig.from_dict(settings.model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.memory = None  # MemoryLink: every chunk is published to the store (and searchable at once)
        if settings.memory_uri and not settings.stub:
            from workers.memory import MemoryLink

            self.memory = MemoryLink(settings.memory_uri, self.cfg, **settings.memory_budget)
        elif self.cfg.memory == "retrieval":
            raise ValueError("memory='retrieval' needs a memory store (settings.memory_uri)")
        if settings.stub:
            self.gen = StubGenerator(self.cfg)
        else:
            from workers.memory import default_embedder

            retriever = self.memory.retriever if self.memory is not None else None
            embedder = default_embedder(self.cfg) if self.memory is not None else None
            self.gen = self._make_generator(retriever, embedder)
        self.streams: dict[str, _Held] = {}
        self.pool = None  # DecodePool: the Wan VAE decoding in Ray actors (--decode-actors)
        source = settings.model_source or {}
        if settings.decode_actors and source.get("vae") and not settings.stub:
            from workers.decode_pool import DecodePool

            self.pool = DecodePool(settings.decode_actors, source["vae"], self.device == "cuda")
        self.capacity = None  # streams this worker's memory holds, measured once the model is loaded
        if not settings.stub:
            from workers.budget import capacity

            self.capacity = capacity(self.cfg, getattr(self.gen, "pixels", None) is not None, self.device)
        self.ckpt_root = settings.checkpoint_uri or str(Path(settings.out_dir) / "streams")
        log.info("worker.start", worker_id=worker_id, pid=os.getpid(), device=self.device)

    def _make_generator(self, retriever, embedder):
        """The generator this worker steps (overridden by workers.group.GroupLeaderImpl)."""
        from workers.generator import Generator
        from workers.models.source import ModelSource

        if self.s.model_source is not None:
            source = ModelSource.from_dict(self.s.model_source)
        else:
            from workers.weights import resolve

            source = ModelSource(weights=resolve(self.s.weights, self.cfg))
        return Generator(self.cfg, device=self.device, memory=retriever, embedder=embedder, source=source,
                         decode_video=self.s.decode_actors == 0)  # fmt: skip

    # ---- queries -----------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return WorkerInfo(self.worker_id, os.getpid(), node_id, self.device, tuple(self.streams), self.capacity)

    def _progress(self, h: _Held, state: str = "running", chunk: Chunk | None = None) -> StreamProgress:
        done = h.output.chunks_done if h.output is not None else h.state.next_chunk
        sid = h.state.stream_id
        if chunk is None:
            return StreamProgress(sid, h.state.next_chunk, done, h.last_checkpoint, state)
        preview, now = None, time.monotonic()
        every = self.s.preview_every_s
        if every is not None and (now - h.preview_at >= every or state == "done"):
            h.preview_at = now
            try:
                preview = preview_png(chunk.frames, latents=chunk.latents)
            except ValueError as e:  # a preview must never fail a step
                log.warning("preview.failed", stream_id=sid, chunk_index=chunk.chunk_index, error=str(e))
        return StreamProgress(
            sid,
            h.state.next_chunk,
            done,
            h.last_checkpoint,
            state,
            frames=chunk.num_frames,
            cache_bytes=h.state.cache.nbytes() if h.state.cache is not None else 0,
            memory_rows=self.memory.rows(sid) if self.memory is not None else None,
            retrieval_ms=getattr(self.gen, "retrieval_ms", {}).get(sid),
            preview=preview,
        )

    # ---- streams -----------------------------------------------------------------------------
    def assign(self, a: StreamAssignment) -> Assigned:
        """Load the stream from its newest valid checkpoint (or start it fresh) and hold it."""
        sid = a.spec.stream_id
        bound = log.bind(stream_id=sid, worker_id=self.worker_id)
        if sid in self.streams:
            h = self.streams[sid]
            return Assigned(sid, h.state.next_chunk, h.last_checkpoint)
        if self.capacity is not None and len(self.streams) >= self.capacity:
            raise ValueError(
                f"worker {self.worker_id} holds {len(self.streams)} streams, all its memory budget on {self.device} "
                f"allows (`longroll plan` sizes a stream)"
            )
        if self.s.stub or not self.s.write_output:
            self.streams[sid] = _Held(a, self.gen.new_stream(a.spec), None, None, None)
            return Assigned(sid, 0, None)
        store = CheckpointStore(self.ckpt_root, sid, keep=self.s.keep_checkpoints)
        loaded, skipped = store.load_latest(self.device)
        if loaded is not None:
            state, ckpt = loaded.state, loaded.chunk
            if state.spec != a.spec:
                raise ValueError(f"{sid}: checkpoint spec {state.spec} differs from the run's {a.spec}")
            self.gen.check_state(state)
        else:
            state, ckpt = self.gen.new_stream(a.spec), None
        out = self._output(sid, a.target_chunks)
        out.start_at(state.next_chunk)
        if a.target_chunks is not None and state.next_chunk >= a.target_chunks:
            # its final checkpoint was saved but the manifest not yet marked done (a crash in between):
            # generating on would run past the target for ever
            out.write_manifest("done", ckpt, {"worker": self.worker_id})
            bound.info("stream.found_done", chunk_index=state.next_chunk, checkpoint=ckpt)
            return Assigned(sid, state.next_chunk, ckpt, skipped, done=True)
        if self.memory is not None and self.cfg.memory == "retrieval":
            # warm the hot tier from the store; the rows a resumed stream may use all predate its checkpoint
            version = loaded.extra.get("memory_table_version") if loaded is not None else None
            self.memory.open_stream(sid, version=version if version and version > 0 else None)
        h = _Held(a, state, out, store, ckpt)
        if self.pool is not None:
            self.pool.open(sid)
        self.streams[sid] = h
        out.write_manifest("running", ckpt, {"worker": self.worker_id})
        bound.info("stream.assigned", chunk_index=state.next_chunk, checkpoint=ckpt, skipped=list(skipped))
        return Assigned(sid, state.next_chunk, ckpt, skipped)

    def _output(self, sid: str, target_chunks: int | None) -> StreamOutput:
        """The stream's segments: mp4, plus latent sidecars when a VAE decodes them (any range re-decodable)."""
        decodes = getattr(self.gen, "pixels", None) is not None or self.pool is not None
        return StreamOutput(Path(self.s.out_dir) / "streams" / sid, sid, self.cfg.fps, self.s.segment_chunks,
                            target_chunks, self.s.keep_segments, self.s.upscale, self.s.crf, keep_latents=decodes,
                            lossless=self.s.lossless)  # fmt: skip

    def _checkpoint(self, h: _Held) -> None:
        extra = {}
        if self.memory is not None:  # pin the version the checkpoint records, so cleanup keeps it
            extra["memory_table_version"] = self.memory.pin_checkpoint(h.state.stream_id, h.state.next_chunk)
        h.last_checkpoint = h.checkpoints.save(h.state, extra)
        if self.memory is not None:  # checkpoints pruned by save() no longer need their versions
            self.memory.release_checkpoints(h.state.stream_id, h.checkpoints.chunks())
        log.info("checkpoint.saved", stream_id=h.state.stream_id, chunk_index=h.last_checkpoint, **extra)

    def release(self, stream_ids: list[str], state: str = "released") -> list[StreamProgress]:
        """Checkpoint and drop streams (on stop, or to move them to another worker)."""
        out = []
        for sid in stream_ids:
            h = self.streams.pop(sid, None)
            if h is None:
                continue
            if hasattr(self.gen, "forget"):
                self.gen.forget(sid)
            self._flush(h)
            if self.pool is not None:
                self.pool.forget(sid)
            if h.output is not None:
                h.output.close_segment()
                if h.last_checkpoint != h.state.next_chunk:
                    self._checkpoint(h)
                h.output.write_manifest(state if state != "released" else "pending", h.last_checkpoint)
            log.info("stream.released", stream_id=sid, chunk_index=h.state.next_chunk, state=state)
            out.append(self._progress(h, state))
        return out

    def step(self) -> StepReport:
        """One batched chunk for every held stream; commit segments, memory rows and checkpoints."""
        t0 = time.perf_counter()
        held = list(self.streams.values())
        if not held:
            return StepReport(self.worker_id, (), 0, 0, 0.0)
        chunks = self.gen.step([h.state for h in held])
        if self.pool is None:
            done = [self._commit(h, chunk) for h, chunk in zip(held, chunks)]
        else:  # decode in the pool: this step's chunks decode while the next step generates
            refs = [self.pool.submit(h.state, c.latents, c.chunk_index) for h, c in zip(held, chunks)]
            done = [self._flush(h) for h in held if h.pending is not None]  # the previous step's, decoded meanwhile
            for h, chunk, ref in zip(held, chunks, refs):
                if h.output.closes_at(chunk.chunk_index):
                    done.append(self._commit(h, replace(chunk, frames=ray.get(ref))))  # closes a segment: now
                else:
                    h.pending = (chunk, ref)
        progress = tuple(p for p, _ in done)
        frames = sum(p.frames for p in progress)
        return StepReport(self.worker_id, progress, len(chunks), frames, time.perf_counter() - t0,
                          sum(n for _, n in done))  # fmt: skip

    def _flush(self, h: _Held) -> tuple[StreamProgress, int] | None:
        """Write the chunk whose frames the decode pool was still making (before anything else of the stream)."""
        if h.pending is None:
            return None
        chunk, ref = h.pending
        h.pending = None
        return self._commit(h, replace(chunk, frames=ray.get(ref)))

    def _commit(self, h: _Held, chunk: Chunk) -> tuple[StreamProgress, int]:
        """A generated (and decoded) chunk: memory row, segment, checkpoint and manifest at boundaries."""
        n_ckpt = 0
        end = chunk.chunk_index + 1
        target = h.assignment.target_chunks
        finished = target is not None and end >= target
        if self.memory is not None:
            self._store_chunk(chunk)
        if h.output is not None:
            closed = h.output.write(chunk)
            if closed and (end % self.s.checkpoint_every == 0 or finished):
                self._checkpoint(h)
                n_ckpt += 1
                if finished:
                    failpoint("after-final-checkpoint")
                h.output.write_manifest(
                    "done" if finished else "running", h.last_checkpoint, {"worker": self.worker_id}
                )
            elif closed:
                h.output.write_manifest("running", h.last_checkpoint, {"worker": self.worker_id})
        if finished:
            del self.streams[chunk.stream_id]
            log.info("stream.done", stream_id=chunk.stream_id, chunk_index=chunk.chunk_index)
        return self._progress(h, "done" if finished else "running", chunk), n_ckpt

    def _store_chunk(self, chunk: Chunk) -> None:
        self.memory.publish(chunk)

    def shutdown(self) -> None:
        for h in self.streams.values():
            if h.output is not None:
                h.output.abort()
        if self.pool is not None:
            self.pool.shutdown()
        if self.memory is not None:
            self.memory.close()


@ray.remote(max_restarts=0, max_task_retries=0)
class GeneratorWorker(GeneratorWorkerImpl):
    """Ray actor. Create with ``GeneratorWorker.options(num_gpus=1 or num_cpus=...)``.

    ``max_restarts=0``: a dead worker stays dead; the orchestrator creates a replacement and reloads
    the worker's streams from their checkpoints (a restarted actor would come back empty anyway).
    """
