"""Table upkeep: compaction, cleanup of old versions, and the vector / scalar indices.

Every commit of a small batch adds a fragment and a version; left alone a day-long stream would hold
tens of thousands of each. The maintainer runs on its own thread so appends never wait for it:
compaction and index builds commit concurrently with the writer's merge_inserts, which LanceDB
rebases (appends and compactions touch different fragments).

Bounded disk: compaction writes files of about ``fragment_target_bytes`` and never touches a full one
again (:func:`compaction_options`), cleanup removes exactly the versions nobody protects, and
:func:`disk_overhead_bound` / :func:`disk_pileup_bytes` state what a table may hold between passes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import lancedb
import structlog
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfPq

from memory_store.config import MemoryStoreConfig
from memory_store.db import connect, dataset_uri, disk_bytes, open_chunk_table

log = structlog.get_logger(__name__)

_COMPACTION_BATCH_BYTES = 2 * 2**20  # bytes of one batch compaction reads and writes
_LANCE_PAGE_BYTES = 8 * 2**20  # Lance flushes a data file's pages at about this size (and checks the cap)
_MATERIALIZE_DELETIONS = 0.1  # a fragment with more than this share of deleted rows is rewritten alone


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
    """One maintenance pass: compact (files of about ``config.fragment_target_bytes``, see
    :func:`compaction_options`), fold new rows into the existing indices, build the chunk_index B-tree
    and, past ``config.index_threshold_rows``, the vector index, then prune old versions.

    Versions kept by cleanup: the newest ``config.keep_versions`` and every tagged version (checkpoints
    tag the version they record, see ``MemoryWriter.pin_version``), and every version after the oldest
    tagged one. Errors are collected in the report, not raised: the data is durable without maintenance.

    Compaction and cleanup go through Lance (``pylance``, the library under LanceDB), which takes the
    compaction options and the exact versions to remove (LanceDB's own ``optimize()`` rewrites every
    fragment below 1M rows, the whole table, on each pass, and prunes by age only).
    """
    rep = MaintenanceReport(stream_id)
    table.checkout_latest()
    try:
        ds = _dataset(table, config)
        rep.fragments_before = rep.fragments_after = len(ds.get_fragments())
        # One compaction per pass: another round right after the index update would merge what this one
        # wrote with the tail (the new rows were not indexed, and Lance does not merge across index
        # coverage), which the next pass does anyway, and keep one more copy alive until cleanup.
        _retry_conflicts(lambda: _compact_once(table, config))
        _retry_conflicts(lambda: _optimize_indices(table, config))  # the new rows into the indices
        rep.fragments_after = len(_dataset(table, config).get_fragments())
    except Exception as e:  # still conflicting: the next pass tries again
        rep.errors.append(f"compaction: {e}")
    table.checkout_latest()
    _build_indices(table, stream_id, config, rep, rows_at_last_index)  # before cleanup, which counts them
    try:
        rep.versions_removed = _retry_conflicts(lambda: _cleanup_versions(table, config))
    except Exception as e:
        rep.errors.append(f"cleanup: {e}")
        log.warning("maintenance_incomplete", stream_id=stream_id, errors=rep.errors)
    table.checkout_latest()
    return rep


def _build_indices(table, stream_id, config, rep: MaintenanceReport, rows_at_last_index: int) -> None:
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


# ---------------------------------------------------------------------------------------- disk bound

# Measured on LanceDB 0.40 / Lance 13 (bench/store_rss.py; docs/memory_store.md, "Bounded memory and disk").
COMMIT_METADATA_BYTES = 72 * 2**10  # manifest + transaction file of one writer commit: each carries the
#                                     ~32 KiB key filter of a primary-key merge_insert (conflict detection)
FRAGMENT_ENTRY_BYTES = 128  # one fragment's entry in every manifest
FILE_OVERHEAD_BYTES = 4 * 2**10  # fixed bytes of one data file (footer, column metadata)
ROW_OVERHEAD_BYTES = 128  # a row's columns besides latents and embedding (index, frames, shape, checksum, ...)
BTREE_BYTES_PER_ROW = 16  # chunk_index B-tree (measured 7)
INDEX_COPIES = 3  # index files alive at once: the current ones, the last update's and a rebuild's
_PASS_VERSIONS = 3  # versions one pass commits (compaction, index update, index build)


def vector_index_bytes_per_row(config: MemoryStoreConfig) -> int:
    """Upper estimate of the vector index's bytes per row (measured 264 for IVF_HNSW_SQ at 64 floats)."""
    if config.index_type == "IVF_HNSW_SQ":  # one byte per float + the HNSW graph + row id
        return config.embedding_dim + 208
    if config.index_type == "IVF_PQ":
        return 16 + 16
    return 4 * config.embedding_dim + 16  # IVF_FLAT: the raw vectors


def disk_pileup_bytes(config: MemoryStoreConfig, row_bytes: int) -> int:
    """Worst-case bytes a stream's table holds beyond its rows' own bytes, between two maintenance
    passes, when no checkpoint pin is older than the newest ``keep_versions`` versions:

        2 * fragment_target_bytes + n * batch_size * row_bytes   the inputs of the last pass's merge:
                                                                 kept versions from before it use them
      + (keep_versions + n + 3) * COMMIT_METADATA_BYTES          manifests and transaction files
      + (n + 8) * FILE_OVERHEAD_BYTES                            small data files not merged yet

    with n = ``compact_every_n_commits``. The first term: a pass merges the table's tail (the fragments
    below the row threshold of :func:`compaction_options`: the last group and what the last cut left
    over, less than twice the target) and the commits since the previous pass (at most ``batch_size``
    rows each); the newest ``keep_versions`` versions include ones from before the pass, which reference
    those inputs until the next pass's cleanup. Not included: a pinned (tagged) version keeps every later
    version too, so while a pin older than the newest ``keep_versions`` versions is held, the inputs and
    metadata of every pass since the pin come on top (checkpoints release their old pins); and a full
    fragment rewritten because over 10% of its rows were replaced (chunks regenerated after a recovery)
    leaves one more target-sized copy until the next pass.
    """
    n = config.compact_every_n_commits
    merged = 2 * config.fragment_target_bytes + n * config.batch_size * row_bytes
    metadata = (config.keep_versions + n + _PASS_VERSIONS) * COMMIT_METADATA_BYTES
    return int(merged + metadata + (n + 8) * FILE_OVERHEAD_BYTES)


def disk_overhead_bound(config: MemoryStoreConfig, row_bytes: int, rows: int | None = None) -> float:
    """Bound on a stream table's disk bytes over its payload bytes (``rows * row_bytes``) between
    maintenance passes.

    ``row_bytes`` is the payload of one row (float16 latents + float32 embedding). Per row the table
    stores ``row_bytes + ROW_OVERHEAD_BYTES`` in its data files, ``INDEX_COPIES`` times the B-tree and
    vector index bytes, and a share of every manifest's entry for its fragment; on top comes the
    table's constant :func:`disk_pileup_bytes`::

        bound(rows) = 1 + (ROW_OVERHEAD_BYTES + INDEX_COPIES * (BTREE_BYTES_PER_ROW + vector)
                           + versions * FRAGMENT_ENTRY_BYTES / rows_per_fragment) / row_bytes
                        + disk_pileup_bytes(config, row_bytes) / (rows * row_bytes)

    ``rows=None`` is the limit of a long stream (the constant amortised away): the factor to apply to
    the payload written per stream-hour; add ``disk_pileup_bytes`` once per stream for a short one.
    """
    if row_bytes < 1:
        raise ValueError(f"{row_bytes=} must be >= 1")
    versions = config.keep_versions + config.compact_every_n_commits + _PASS_VERSIONS
    rows_per_fragment = max(1.0, target_rows_per_fragment(config, row_bytes) * 0.7)  # full files: 70%+
    index = INDEX_COPIES * (BTREE_BYTES_PER_ROW + vector_index_bytes_per_row(config))
    per_row = ROW_OVERHEAD_BYTES + index + versions * FRAGMENT_ENTRY_BYTES / rows_per_fragment
    bound = 1 + per_row / row_bytes
    if rows is not None:
        if rows < 1:
            raise ValueError(f"{rows=} must be >= 1")
        bound += disk_pileup_bytes(config, row_bytes) / (rows * row_bytes)
    return bound


def table_disk_bytes(config: MemoryStoreConfig, stream_id: str) -> int:
    """Bytes on disk of ``stream_id``'s table directory (local stores only; see ``db.disk_bytes``)."""
    return disk_bytes(dataset_uri(config, stream_id))


# ---------------------------------------------------------------------------------------- compaction


def target_rows_per_fragment(config: MemoryStoreConfig, row_bytes: float) -> int:
    """Rows of a ``config.fragment_target_bytes`` fragment of ``row_bytes``-byte rows (at least 1)."""
    return max(1, int(config.fragment_target_bytes // max(1.0, row_bytes)))


def compaction_options(config: MemoryStoreConfig, row_bytes: float) -> dict:
    """Lance ``compact_files`` options for ``row_bytes``-byte rows: data files of most of
    ``config.fragment_target_bytes`` and not more, and a file once full is never rewritten.

    Lance 13 merges each run of adjacent fragments below ``target_rows_per_fragment`` rows (or with over
    10% of their rows deleted) that the same index segments cover; it cuts a run at fragment boundaries
    into groups of at least that many rows (the remainder joins the last group) and writes each group as
    files of at most ``max_bytes_per_file``, which it checks each time it flushes a page (~8 MiB). So the
    cap is the target less a page, and the row threshold 95% of a capped file's rows: every group holds
    at least 95% of a capped file and is written as one file, or, past the cap, as a full file (above
    the threshold: never a candidate again) and a small rest that the next pass merges. A pass thus
    rewrites the table's tail (less than the target) and the commits since the last pass, however
    long the table; LanceDB's own ``optimize()`` uses 1M rows, so every fragment of a day-long stream was
    "small" and each pass rewrote the whole table. Below ``4 * _LANCE_PAGE_BYTES`` (32 MiB) the cap is
    the target itself and Lance cannot hold it: a file may exceed a small target by up to a page.
    """
    row_bytes = max(1.0, row_bytes)
    target = config.fragment_target_bytes
    cap = target - _LANCE_PAGE_BYTES if target >= 4 * _LANCE_PAGE_BYTES else target
    batch = max(1, min(1024, int(_COMPACTION_BATCH_BYTES // row_bytes)))
    return dict(
        target_rows_per_fragment=max(1, int(0.95 * cap / row_bytes)),
        max_bytes_per_file=max(1, cap),
        max_rows_per_group=batch,  # only the legacy file format has row groups
        batch_size=batch,  # rows read per batch (~2 MiB)
        num_threads=1,  # maintenance runs beside the generator
        materialize_deletions_threshold=_MATERIALIZE_DELETIONS,
    )


def _data_bytes_per_row(ds) -> float:
    rows = nbytes = 0
    for frag in ds.get_fragments():
        rows += int(frag.metadata.physical_rows or 0)
        nbytes += sum(int(f.file_size_bytes or 0) for f in frag.metadata.files)
    return nbytes / rows if rows else 0.0


def _compact_once(table, config: MemoryStoreConfig) -> bool:
    """One compaction of the latest version (:func:`compaction_options`); False when it merged nothing."""
    table.checkout_latest()
    ds = _dataset(table, config)
    row_bytes = _data_bytes_per_row(ds)
    if row_bytes == 0:
        return False
    metrics = ds.optimize.compact_files(**compaction_options(config, row_bytes))
    table.checkout_latest()
    return metrics.fragments_removed > 0


def _optimize_indices(table, config: MemoryStoreConfig) -> None:
    """Fold rows not yet indexed into the existing indices (no retraining)."""
    table.checkout_latest()
    ds = _dataset(table, config)
    if ds.describe_indices():
        ds.optimize.optimize_indices()
        table.checkout_latest()


def _cleanup_versions(table, config: MemoryStoreConfig) -> int:
    """Remove exactly the versions older than both the ``keep_versions``-th newest and the oldest tagged
    version; returns how many went. Lance deletes the files (data, deletion, index, transaction and
    manifest) that only they referenced; files of a commit in flight are referenced by no manifest yet
    and are left alone (``delete_unverified`` stays False)."""
    table.checkout_latest()
    ds = _dataset(table, config)
    versions = sorted(int(v["version"]) for v in ds.versions())
    if len(versions) <= config.keep_versions:
        return 0
    protected = [versions[-config.keep_versions]]
    protected += [int(t["version"]) for t in ds.tags.list().values() if int(t["version"]) in set(versions)]
    old = [v for v in versions if v < min(protected)]
    if not old:
        return 0
    ds.cleanup_old_versions(versions=old, error_if_tagged_old_versions=False)
    table.checkout_latest()
    return len(set(old) - {int(v["version"]) for v in _dataset(table, config).versions()})


def _dataset(table, config: MemoryStoreConfig):
    """The Lance dataset behind ``table`` at its checked-out version, on caches of its own bounded by
    ``config.lance_*_cache_bytes``; they go with the dataset at the end of its step of the pass (a
    process-wide Lance session would hold that much more for good, for little gain: a pass reads each
    manifest and file footer about once)."""
    return table.to_lance(
        index_cache_size_bytes=config.lance_index_cache_bytes,
        metadata_cache_size_bytes=config.lance_metadata_cache_bytes,
    )


def _retry_conflicts(fn, attempts: int = 4):
    """Call ``fn``; on a LanceDB retryable commit conflict (a concurrent commit won) try again."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if "Retryable commit conflict" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Hand the heap memory a pass freed back to the OS (glibc keeps it in its arenas otherwise: the
    compaction's buffers, freed on Lance's threads, left the writer's RSS at its highest pass)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
        self._db = None

    def _pass(self, stream_id: str) -> MaintenanceReport:
        with self._pass_lock:
            if self._db is None:
                self._db = connect(self.config)
            table = open_chunk_table(self._db, stream_id, self.config.embedding_dim)
            rep = maintain_table(
                table, stream_id, self.config, rows_at_last_index=self._rows_at_index.get(stream_id, 0)
            )
            _release_freed_memory()
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
