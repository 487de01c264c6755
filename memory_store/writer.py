"""Batched, asynchronous, idempotent writes of generated chunks into the shared LanceDB database.

``put`` validates and serializes a chunk in the caller's thread (so bad input fails at once, and the
queued item no longer aliases the caller's tensors), then hands it to a bounded queue. A commit thread
drains the queue into batches of up to ``batch_size`` chunks, waiting at most ``flush_interval_s`` for a
batch to fill, and commits each stream's part of a batch with one ``merge_insert`` keyed on
``chunk_index`` (one table per stream). The key column is the table's LanceDB primary key, so two
writers committing the same chunk at once detect the conflict and retry instead of both inserting: a
chunk regenerated after a recovery replaces its earlier copy, never duplicates it.

A failed commit (after retries) stops the writer; the error is raised by the next ``put``/``flush``/
``close``. The rows committed before it stay durable; ``durable_chunk_index`` tells a recovering
generator where to resume.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import structlog

from memory_store.config import MemoryStoreConfig
from memory_store.db import (
    connect,
    contiguous_prefix_end,
    limit_malloc_arenas,
    open_chunk_table,
    read_chunk_indices,
)
from memory_store.maintenance import Maintainer, MaintenanceReport
from memory_store.schema import (
    ChunkRecord,
    EncodedChunk,
    MemoryStoreError,
    chunk_schema,
    encode_record,
    encoded_to_table,
    validate_stream_id,
)

log = structlog.get_logger(__name__)

_POLL_S = 0.05  # how often blocked calls re-check for errors / shutdown


@dataclass
class WriterStats:
    chunks_put: int = 0
    chunks_committed: int = 0  # rows sent in commits (after in-batch dedup)
    commits: int = 0  # merge_insert calls that succeeded (one per stream per batch)
    commit_attempts: int = 0  # LanceDB attempts, > commits when concurrent writers conflicted
    commit_retries: int = 0  # whole-commit retries after an error


class MemoryWriter:
    """Writes :class:`~memory_store.schema.ChunkRecord` s for any number of streams into one database.

    Thread-safe: several generator threads may share one writer. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, config: MemoryStoreConfig) -> None:
        self.config = config
        self.stats = WriterStats()
        self._schema = chunk_schema(config.embedding_dim)
        limit_malloc_arenas()  # before LanceDB's threads start: a day of commits at flat RSS
        # the process's shared connection on the bounded LanceDB session (db.connect); the table handles
        # below are the commit thread's own
        self._db = connect(config)
        self._tables: dict[str, object] = {}
        self._queue: queue.Queue[tuple[int, EncodedChunk]] = queue.Queue(maxsize=config.queue_max)
        self._put_lock = threading.Lock()
        self._cv = threading.Condition()
        self._put_seq = 0  # sequence number of the last chunk put
        self._done_seq = 0  # every chunk with seq <= this is durable
        self._error: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._flush_requested = threading.Event()
        self._maintainer = Maintainer(config)
        self._commit_listeners: list = []  # fn(stream_id, chunk_indices) after each durable commit
        self._thread = threading.Thread(target=self._run, name="memory-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def put(self, record: ChunkRecord, timeout: float | None = None) -> None:
        """Queue one chunk for a batched commit; blocks while the queue is full (backpressure).

        Raises:
            ValueError / ChecksumError: the record is invalid (see ``schema.encode_record``).
            TimeoutError: the queue stayed full for ``timeout`` seconds.
            MemoryStoreError: the writer is closed or its commit thread failed.
        """
        item = encode_record(record, self.config.embedding_dim)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._put_lock:
            self._raise_if_unusable()
            seq = self._put_seq + 1
            while True:
                try:
                    self._queue.put((seq, item), timeout=_POLL_S)
                    break
                except queue.Full:
                    self._raise_if_unusable()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"{item.stream_id}[{item.chunk_index}]: writer queue full for {timeout}s"
                        ) from None
            self._put_seq = seq
            self.stats.chunks_put += 1

    def add_commit_listener(self, fn) -> None:
        """Call ``fn(stream_id, chunk_indices)`` on the commit thread after each commit of a stream's
        rows is durable (the retriever uses it to let go of payloads the store now has)."""
        self._commit_listeners.append(fn)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk put before this call is durable.

        Raises:
            TimeoutError: not durable within ``timeout`` seconds.
            MemoryStoreError: the commit thread failed (the cause is chained).
        """
        target = self._put_seq
        deadline = None if timeout is None else time.monotonic() + timeout
        self._flush_requested.set()
        with self._cv:
            while self._done_seq < target:
                if self._error is not None:
                    raise MemoryStoreError(f"memory writer failed: {self._error!r}") from self._error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"flush: {target - self._done_seq} chunks not durable after {timeout}s")
                self._cv.wait(_POLL_S if left is None else min(left, _POLL_S))
        if self._error is not None:
            raise MemoryStoreError(f"memory writer failed: {self._error!r}") from self._error

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the commit and maintenance threads. Idempotent. Re-raises a commit failure."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._stop.set()
            self._thread.join()
            self._maintainer.close()
            self._tables.clear()  # the handles (and the version state they hold) go with the writer

    def durable_chunk_index(self, stream_id: str) -> int:
        """Highest chunk index d of ``stream_id`` such that chunks 0..d are all durable; -1 if none.

        Read from the database (any process's commits count), so a recovering generator resumes at
        d + 1 and regenerates the tail that a crash lost.
        """
        db = connect(self.config)
        try:
            table = open_chunk_table(db, validate_stream_id(stream_id), self.config.embedding_dim)
        except LookupError:
            return -1
        return contiguous_prefix_end(read_chunk_indices(table))

    def table_version(self, stream_id: str) -> int:
        """Latest version of ``stream_id``'s table (created empty if absent), to record in a checkpoint."""
        db = connect(self.config)
        return open_chunk_table(db, validate_stream_id(stream_id), self.config.embedding_dim, create=True).version

    def pin_version(self, stream_id: str, tag: str) -> int:
        """Flush, then tag the table's current version so that cleanup keeps it; returns the version.

        A checkpoint pins the version it records (tag e.g. ``ckpt-000120``) and unpins the one it replaces.
        """
        self.flush()
        db = connect(self.config)
        table = open_chunk_table(db, validate_stream_id(stream_id), self.config.embedding_dim, create=True)
        version = table.version
        if tag in table.tags.list():
            table.tags.update(tag, version)
        else:
            table.tags.create(tag, version)
        log.info("version_pinned", stream_id=stream_id, tag=tag, version=version)
        return version

    def unpin_version(self, stream_id: str, tag: str) -> None:
        """Drop a tag made by :meth:`pin_version` (no-op if absent)."""
        db = connect(self.config)
        table = open_chunk_table(db, validate_stream_id(stream_id), self.config.embedding_dim)
        if tag in table.tags.list():
            table.tags.delete(tag)

    def maintain(self, stream_id: str) -> MaintenanceReport:
        """Run compaction, version cleanup and indexing for ``stream_id`` now (after a flush)."""
        self.flush()
        return self._maintainer.run_now(validate_stream_id(stream_id))

    def wait_maintenance(self, timeout: float | None = None) -> bool:
        """Wait for scheduled background maintenance to finish; False on timeout."""
        return self._maintainer.wait_idle(timeout)

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ commit thread

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise MemoryStoreError(f"memory writer failed: {self._error!r}") from self._error
        if self._closed or self._stop.is_set():
            raise MemoryStoreError("memory writer is closed")

    def _run(self) -> None:
        try:
            while True:
                batch = self._collect()
                if batch:
                    self._commit(batch)
                elif self._stop.is_set():
                    return
        except BaseException as e:
            log.error("memory_writer_failed", error=repr(e))
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _collect(self) -> list[tuple[int, EncodedChunk]]:
        """Up to ``batch_size`` queued chunks; waits at most ``flush_interval_s`` after the first one."""
        try:
            batch = [self._queue.get(timeout=_POLL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.config.flush_interval_s
        while len(batch) < self.config.batch_size:
            hurry = self._flush_requested.is_set() or self._stop.is_set()
            left = deadline - time.monotonic()
            try:
                if hurry or left <= 0:
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(self._queue.get(timeout=min(left, _POLL_S)))
            except queue.Empty:
                if hurry or left <= 0:
                    break
        return batch

    def _commit(self, batch: list[tuple[int, EncodedChunk]]) -> None:
        by_stream: dict[str, dict[int, EncodedChunk]] = {}
        for _, rec in batch:  # the last put of a chunk wins; merge_insert must not see duplicate keys
            by_stream.setdefault(rec.stream_id, {})[rec.chunk_index] = rec
        for stream_id, rows in by_stream.items():
            self._commit_stream(stream_id, sorted(rows.values(), key=lambda r: r.chunk_index))
        with self._cv:
            self._done_seq = batch[-1][0]
            if self._done_seq >= self._put_seq:
                self._flush_requested.clear()
            self._cv.notify_all()

    def _commit_stream(self, stream_id: str, rows: list[EncodedChunk]) -> None:
        data = encoded_to_table(rows, self._schema)
        for attempt in range(self.config.commit_retries + 1):
            try:
                table = self._tables.get(stream_id)
                if table is None:
                    table = open_chunk_table(self._db, stream_id, self.config.embedding_dim, create=True)
                    self._tables[stream_id] = table
                else:
                    # the merge reads the handle's version: move it past other processes' commits and the
                    # maintainer's compactions, whose cleanup removes the files of old versions
                    table.checkout_latest()
                result = (
                    table.merge_insert("chunk_index")
                    # LanceDB 0.40: a merge joined through the chunk_index B-tree misses rows that a
                    # concurrent writer just inserted, and both copies survive. The scan join does not.
                    .use_index(False)
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(data)
                )
                break
            except ValueError:  # schema mismatch and other bad input: retrying cannot help
                raise
            except Exception as e:
                self._tables.pop(stream_id, None)
                if attempt == self.config.commit_retries:
                    raise MemoryStoreError(f"{stream_id}: commit of {len(rows)} chunks failed: {e!r}") from e
                self.stats.commit_retries += 1
                log.warning("commit_retry", stream_id=stream_id, attempt=attempt + 1, error=repr(e))
                time.sleep(0.1 * 2**attempt)
        self.stats.commits += 1
        self.stats.commit_attempts += int(result.num_attempts)
        self.stats.chunks_committed += len(rows)
        log.debug(
            "chunks_committed",
            stream_id=stream_id,
            first_chunk=rows[0].chunk_index,
            last_chunk=rows[-1].chunk_index,
            rows=len(rows),
            version=result.version,
        )
        chunks = [r.chunk_index for r in rows]
        for fn in self._commit_listeners:
            try:
                fn(stream_id, chunks)
            except Exception as e:  # noqa: BLE001 - a listener's bug must not stop the commits
                log.error("commit_listener_failed", stream_id=stream_id, error=repr(e))
        self._maintainer.notify_commit(stream_id)
