"""Direct stream migration between workers: the stream's state moves through Ray's object store.

``export_streams`` on the source closes the stream's open segment (so everything it generated is
committed output, named by chunk range), serialises its state to safetensors bytes + JSON meta, puts
the bytes into the object store and drops the stream. ``import_streams`` on the destination verifies
the payload checksum, rebuilds the state and continues the stream at the chunk the source stopped at,
with a new segment from there: no segment is written twice and none is lost. Nothing is written to
checkpoint storage; the stream's newest checkpoint stays the fallback if the move fails half-way.
"""

from __future__ import annotations

import json
import time

import ray
import structlog

from workers.checkpoints import CheckpointStore
from workers.messages import Assigned, StreamAssignment, StreamHandoff
from workers.state import StreamState

log = structlog.get_logger(__name__)


class StreamMigration:
    """Mixed into :class:`workers.worker.GeneratorWorkerImpl` (uses its ``streams``, ``gen``, ``s``, ...)."""

    def _stream_bytes(self, h) -> tuple[bytes, dict]:
        """(safetensors bytes, meta) of a held stream's state (a group gathers its shards first)."""
        if h.state.cache is None:
            raise ValueError(f"{h.state.stream_id}: this worker's streams have no cache state to move")
        return h.state.to_bytes()

    def export_streams(self, stream_ids: list[str]) -> list[StreamHandoff]:
        """Hand streams over: close their segments, put their states in the object store, drop them.

        Raises before dropping anything if a state cannot be serialised (the stream stays here).
        """
        out = []
        for sid in stream_ids:  # a chunk still decoding in the pool is written first
            if sid in self.streams:
                self._flush(self.streams[sid])
        blobs = {sid: self._stream_bytes(self.streams[sid]) for sid in stream_ids if sid in self.streams}
        if self.memory is not None:
            self.memory.flush()  # the destination's reads of this stream's history see every chunk
        for sid, (payload, meta) in blobs.items():
            h = self.streams.pop(sid)
            if hasattr(self.gen, "forget"):
                self.gen.forget(sid)
            if self.pool is not None:
                self.pool.forget(sid)
            if h.output is not None:
                h.output.close_segment()
                h.output.write_manifest("pending", h.last_checkpoint)
            ref = ray.put(payload)
            out.append(StreamHandoff(sid, h.assignment.target_chunks, h.last_checkpoint, json.dumps(meta), ref,
                                     len(payload)))  # fmt: skip
            log.info("stream.exported", stream_id=sid, chunk_index=h.state.next_chunk, bytes=len(payload))
        return out

    def import_streams(self, handoffs: list[StreamHandoff]) -> list[Assigned]:
        """Take over streams from :meth:`export_streams` and continue them where they stopped.

        Raises:
            ValueError: a payload fails its checksum or was made by another model config.
        """
        from workers.worker import _Held

        out = []
        for hd in handoffs:
            t0 = time.perf_counter()
            state = StreamState.from_bytes(ray.get(hd.payload), json.loads(hd.meta_json), self.device)
            self.gen.check_state(state)
            sid = state.stream_id
            a = StreamAssignment(state.spec, hd.target_chunks)
            if self.s.stub or not self.s.write_output:
                self.streams[sid] = _Held(a, state, None, None, hd.last_checkpoint)
                out.append(Assigned(sid, state.next_chunk, hd.last_checkpoint))
                continue
            if self.memory is not None and self.cfg.memory == "retrieval":
                self.memory.open_stream(sid)
            o = self._output(sid, a.target_chunks)
            if self.pool is not None:
                self.pool.open(sid)
            o.start_at(state.next_chunk)
            store = CheckpointStore(self.ckpt_root, sid, keep=self.s.keep_checkpoints)
            self.streams[sid] = _Held(a, state, o, store, hd.last_checkpoint)
            o.write_manifest("running", hd.last_checkpoint, {"worker": self.worker_id})
            log.info("stream.imported", stream_id=sid, chunk_index=state.next_chunk, worker_id=self.worker_id,
                     seconds=time.perf_counter() - t0)  # fmt: skip
            out.append(Assigned(sid, state.next_chunk, hd.last_checkpoint))
        return out
