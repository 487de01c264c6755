"""Table upkeep: compaction, cleanup of old versions, and the vector / scalar indices.

Every commit of a small batch adds a fragment and a version; left alone a day-long stream would hold
tens of thousands of each. The maintainer runs on its own thread so appends never wait for it:
compaction and index builds commit concurrently with the writer's merge_inserts, which LanceDB
rebases (appends and compactions touch different fragments).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import lancedb
import structlog
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfPq

from memory_store.config import MemoryStoreConfig
from memory_store.db import connect, open_chunk_table

log = structlog.get_logger(__name__)

_NEVER = timedelta(days=36500)  # "cleanup nothing" for optimize(); pruning is done separately, below
_CLEANUP_MARGIN_S = 1.0  # most that cleanup's age cutoff is set before the oldest protected version


@dataclass
class MaintenanceReport:
    """What one maintenance pass over a stream's table did."""

    stream_id: str
    fragments_before: int = 0
    fragments_after: int = 0
    versions_removed: int = 0
    index_built: bool = False
    rows: int = 0
    errors: list[str] = field(default_factory=list)


def vector_index_config(config: MemoryStoreConfig, rows: int):
    """LanceDB index config for ``rows`` cosine-searched embeddings (partitions ~ sqrt(rows))."""
    if config.index_type == "IVF_HNSW_SQ":  # few, large partitions, each an HNSW graph
        return IvfHnswSq(distance_type="cosine", num_partitions=max(1, int(rows**0.5) // 8))
    if config.index_type == "IVF_PQ":
        sub = next(s for s in (16, 8, 4, 2, 1) if config.embedding_dim % s == 0)
        return IvfPq(distance_type="cosine", num_partitions=max(1, int(rows**0.5)), num_sub_vectors=sub)
    return IvfFlat(distance_type="cosine", num_partitions=max(1, int(rows**0.5)))


def _vector_index_rows(table) -> int | None:
    """Rows covered by the table's vector index, or None when it has none."""
    for ix in table.list_indices():
        if "embedding" in ix.columns:
            return int(ix.num_indexed_rows or 0)
    return None


def maintain_table(
    table, stream_id: str, config: MemoryStoreConfig, *, rows_at_last_index: int = 0
) -> MaintenanceReport:
    """One maintenance pass: compact (and fold new rows into existing indices), prune old versions,
    then build the chunk_index B-tree and, past ``config.index_threshold_rows``, the vector index.

    Versions kept by cleanup: the newest ``config.keep_versions`` and every tagged version (checkpoints
    tag the version they record, see ``MemoryWriter.pin_version``). Errors are collected in the report,
    not raised: the data is durable without maintenance.
    """
    rep = MaintenanceReport(stream_id)
    try:
        table.checkout_latest()
        rep.fragments_before = rep.fragments_after = _fragments(table)
        # Compact until stable (one pass can leave fragments a second pass merges): the prune below is
        # an optimize() too, and must find nothing left to rewrite, or its new version would keep the
        # files of the one it replaces alive.
        for _ in range(3):
            _retry_conflicts(lambda: table.optimize(cleanup_older_than=_NEVER))  # compaction + index update
            before, rep.fragments_after = rep.fragments_after, _fragments(table)
            if rep.fragments_after >= before or rep.fragments_after <= 1:
                break
    except Exception as e:  # still conflicting: the next pass tries again
        rep.errors.append(f"compaction: {e}")
    try:
        rep.versions_removed = _retry_conflicts(lambda: _cleanup(table, config.keep_versions))
    except Exception as e:
        rep.errors.append(f"cleanup: {e}")
    try:
        rep.rows = table.count_rows()
        if rep.rows > 0 and not any("chunk_index" in ix.columns for ix in table.list_indices()):
            table.create_index("chunk_index", config=BTree())
        indexed = _vector_index_rows(table)
        if indexed is not None and rows_at_last_index == 0:  # built by an earlier process
            rows_at_last_index = indexed
        grown = rep.rows >= rows_at_last_index * config.index_rebuild_growth
        if rep.rows >= config.index_threshold_rows and (indexed is None or grown):
            t0 = time.perf_counter()
            table.create_index("embedding", config=vector_index_config(config, rep.rows), replace=True)
            rep.index_built = True
            log.info("vector_index_built", stream_id=stream_id, rows=rep.rows, s=time.perf_counter() - t0)
    except Exception as e:
        rep.errors.append(f"index: {e}")
    if rep.errors:
        log.warning("maintenance_incomplete", stream_id=stream_id, errors=rep.errors)
    return rep


def _fragments(table) -> int:
    return table.stats()["fragment_stats"]["num_fragments"]


def _retry_conflicts(fn, attempts: int = 4):
    """Call ``fn``; on a LanceDB retryable commit conflict (a concurrent commit won) try again."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if "Retryable commit conflict" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def _cleanup(table, keep_versions: int) -> int:
    """Remove versions older than both the ``keep_versions``-th newest and the oldest tagged version.

    LanceDB's cleanup takes an age, not a version: versions older than ``now - older_than`` go. The
    age is computed here from the oldest protected version's timestamp, minus a margin for the time
    between this clock reading and LanceDB's. The margin is at most half the gap to the version just
    before, so that versions committed in quick succession (a compaction commits two) still go.
    """
    versions = sorted(table.list_versions(), key=lambda v: v["version"])
    if len(versions) <= keep_versions:
        return 0
    ts = {v["version"]: v["timestamp"].timestamp() for v in versions}
    protected = [versions[-keep_versions]["version"]]
    protected += [t["version"] for t in table.tags.list().values() if t["version"] in ts]
    oldest = min(protected, key=lambda v: ts[v])
    older = [v for v in ts if ts[v] < ts[oldest]]
    if not older:
        return 0
    margin = min(_CLEANUP_MARGIN_S, (ts[oldest] - max(ts[v] for v in older)) / 2)
    older_than = time.time() - ts[oldest] + margin
    # optimize() prunes after compacting; maintain_table compacted until stable, so it only prunes.
    table.optimize(cleanup_older_than=timedelta(seconds=older_than))
    return len(set(ts) - {v["version"] for v in table.list_versions()})


class Maintainer:
    """Background thread running :func:`maintain_table` for streams that crossed their commit budget."""

    def __init__(self, config: MemoryStoreConfig) -> None:
        self.config = config
        self._db: lancedb.DBConnection | None = None
        self._commits: dict[str, int] = {}
        self._rows_at_index: dict[str, int] = {}
        self._due: list[str] = []
        self._cv = threading.Condition()
        self._stop = False
        self._busy = False
        self._pass_lock = threading.Lock()  # one pass at a time: two compactions would conflict
        self.passes = 0
        self.index_builds = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="memory-maintainer", daemon=True)
        self._thread.start()

    def notify_commit(self, stream_id: str) -> None:
        """Count one commit to ``stream_id``; schedule a pass every ``compact_every_n_commits``."""
        with self._cv:
            n = self._commits.get(stream_id, 0) + 1
            self._commits[stream_id] = n
            if n >= self.config.compact_every_n_commits and stream_id not in self._due:
                self._due.append(stream_id)
                self._cv.notify_all()

    def run_now(self, stream_id: str) -> MaintenanceReport:
        """A synchronous pass (used by ``MemoryWriter.maintain``, benchmarks and tests)."""
        with self._cv:
            self._commits[stream_id] = 0
        return self._pass(stream_id)

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._due or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()

    def _pass(self, stream_id: str) -> MaintenanceReport:
        with self._pass_lock:
            if self._db is None:
                self._db = connect(self.config)
            table = open_chunk_table(self._db, stream_id, self.config.embedding_dim)
            rep = maintain_table(
                table, stream_id, self.config, rows_at_last_index=self._rows_at_index.get(stream_id, 0)
            )
        indexed = _vector_index_rows(table) if rep.index_built or stream_id not in self._rows_at_index else None
        with self._cv:
            self.passes += 1
            self.errors += bool(rep.errors)
            self.index_builds += rep.index_built
            if indexed is not None:
                self._rows_at_index[stream_id] = indexed
        log.debug("maintenance_pass", **rep.__dict__)
        return rep

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._due and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                stream_id = self._due.pop(0)
                self._commits[stream_id] = 0
                self._busy = True
            try:
                self._pass(stream_id)
            except Exception as e:  # never let upkeep take the writer down
                log.warning("maintenance_failed", stream_id=stream_id, error=repr(e))
                with self._cv:
                    self.errors += 1
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
