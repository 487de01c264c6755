"""Per-stream checkpoints through pyarrow.fs: a local path or an object-store URI (s3://, gs://, ...).

Layout under the root: ``<stream_id>/checkpoints/<chunk:08d>/{state.safetensors, meta.json}``.
``state.safetensors`` is written first; ``meta.json`` (the stream state's meta, the payload sha256,
extra fields such as the memory-store table version, and its own sha256) is the commit record written
last. A directory without a valid ``meta.json`` or whose payload fails the checksum is not a checkpoint:
loading passes over it (and logs why) to the previous one. Only the newest ``keep`` are kept.

On a local filesystem each file is committed durably (workers.durable: temp file, fsync, rename,
fsync of the directory) in that order, state first, then meta, then the checkpoints directory that
holds the new chunk's folder, so after a power loss a checkpoint is either whole or not there. On an
object store (s3://, gs://, ...) each PUT is atomic and durable on its own: nothing is fsynced.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs
import structlog

from workers.durable import fsync_dir, write_atomic
from workers.state import META_FILE, STATE_FILE, StreamState

log = structlog.get_logger(__name__)


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a URI with a scheme or a plain local path."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class LoadedCheckpoint:
    state: StreamState
    chunk: int
    extra: dict


class CheckpointStore:
    """Checkpoints of one stream. ``root`` is a URI or path; the stream's folder is created beneath it."""

    def __init__(self, root: str, stream_id: str, keep: int = 3):
        if keep < 1:
            raise ValueError(f"{keep=} must be >= 1")
        self.fs, base = open_fs(root)
        self.dir = f"{base.rstrip('/')}/{stream_id}/checkpoints"
        self.stream_id, self.keep = stream_id, keep
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._parents_synced = False  # the stream's folders above self.dir, made durable on the first save

    def _write(self, path: str, data: bytes, durable: bool = True) -> None:
        if self.local:  # pyarrow's local paths are plain OS paths: commit with fsyncs
            write_atomic(path, data, durable=durable)
            return
        # tmp + move: object stores make each PUT atomic (and durable) on their own
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def _sync_dirs(self, durable: bool) -> None:
        """Make the new chunk folder's name durable (and, once, the folders create_dir may have made)."""
        if not self.local:
            return
        fsync_dir(self.dir, durable=durable)
        if not self._parents_synced:
            stream_dir = os.path.dirname(self.dir)
            for d in (stream_dir, os.path.dirname(stream_dir)):
                fsync_dir(d, durable=durable)
            self._parents_synced = durable

    def chunks(self) -> list[int]:
        """Chunk numbers of the checkpoint directories present (valid or not), ascending."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        except (FileNotFoundError, OSError):
            return []
        out = [int(i.base_name) for i in infos if i.type == pafs.FileType.Directory and i.base_name.isdigit()]
        return sorted(out)

    def save(self, state: StreamState, extra: dict | None = None, *, durable: bool = True) -> int:
        """Write a checkpoint at ``state.next_chunk``; prune to the newest ``keep``. Returns the chunk.

        ``durable=False`` skips the fsyncs; it exists for bench/durability.py only.
        """
        chunk = state.next_chunk
        d = f"{self.dir}/{chunk:08d}"
        self.fs.create_dir(d, recursive=True)
        payload, meta = state.to_bytes()
        meta = {**meta, "chunk": chunk, "extra": extra or {}}
        meta["meta_sha256"] = _meta_digest(meta)
        self._write(f"{d}/{STATE_FILE}", payload, durable)
        self._write(f"{d}/{META_FILE}", json.dumps(meta, indent=1).encode(), durable)  # the commit record
        self._sync_dirs(durable)
        for old in self.chunks()[: -self.keep]:
            if old < chunk:
                self.fs.delete_dir(f"{self.dir}/{old:08d}")
        return chunk

    def load(self, chunk: int, device: str = "cpu") -> tuple[StreamState, dict]:
        """Load and verify one checkpoint. Raises ValueError (with the reason) if it is not valid."""
        d = f"{self.dir}/{chunk:08d}"
        try:
            with self.fs.open_input_stream(f"{d}/{META_FILE}") as f:
                meta = json.loads(f.read())
            with self.fs.open_input_stream(f"{d}/{STATE_FILE}") as f:
                payload = f.read()
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
        if not isinstance(meta, dict) or meta.get("meta_sha256") != _meta_digest(meta):
            raise ValueError("meta.json does not match its sha256")
        if meta.get("chunk") != chunk or meta["spec"]["stream_id"] != self.stream_id:
            raise ValueError(f"meta.json describes {meta['spec']['stream_id']}@{meta.get('chunk')}")
        state = StreamState.from_bytes(payload, meta, device)  # verifies the payload sha256
        if state.next_chunk != chunk:
            raise ValueError(f"state is at chunk {state.next_chunk}, directory says {chunk}")
        return state, meta.get("extra", {})

    def load_latest(self, device: str = "cpu") -> tuple[LoadedCheckpoint | None, tuple[str, ...]]:
        """The newest checkpoint that verifies (None if there is none), falling back past invalid ones.

        Returns:
            (checkpoint or None, "<chunk>: <reason>" for every newer checkpoint that failed verification)
        """
        skipped: list[str] = []
        for chunk in reversed(self.chunks()):
            try:
                state, extra = self.load(chunk, device)
            except (ValueError, KeyError, TypeError) as e:
                reason = f"{chunk}: {e}"
                skipped.append(reason)
                log.warning(
                    "checkpoint.invalid",
                    stream_id=self.stream_id,
                    chunk_index=chunk,
                    reason=str(e),
                    action="falling back to the previous checkpoint",
                )
                continue
            if skipped:
                log.warning("checkpoint.fallback", stream_id=self.stream_id, chunk_index=chunk, skipped=skipped)
            return LoadedCheckpoint(state, chunk, extra), tuple(skipped)
        if skipped:
            log.warning("checkpoint.none_valid", stream_id=self.stream_id, skipped=skipped)
        return None, tuple(skipped)
