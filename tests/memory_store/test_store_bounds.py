"""Bounded memory and disk of the store: the LanceDB session, version and fragment counts, bytes on disk.

Deterministic: maintenance runs only through explicit ``maintain`` calls (the fixture's configs never
schedule a background pass), and nothing here reads RSS or a clock (bench/store_rss.py measures RSS).
"""

from __future__ import annotations

import math
from pathlib import Path

import lancedb
import pytest

import memory_store.db as db
from memory_store.db import connect, dataset_uri, disk_bytes, open_chunk_table
from memory_store.maintenance import compaction_options, disk_overhead_bound, disk_pileup_bytes
from memory_store.writer import MemoryWriter
from tests.memory_store.procs import DIM, make_record

SHAPE = (1, 3, 32, 32)  # 6 KiB of float16 latents a row: a tiny-preset latent frame
ROW_PAYLOAD = math.prod(SHAPE) * 2 + DIM * 4


def put_commits(w: MemoryWriter, stream_id: str, start: int, commits: int, per_commit: int) -> int:
    for c in range(commits):
        for i in range(per_commit):
            w.put(make_record(stream_id, start + c * per_commit + i, shape=SHAPE))
        w.flush()
    return start + commits * per_commit


def fragments(cfg, stream_id: str = "s") -> list:
    table = open_chunk_table(connect(cfg), stream_id, DIM)
    return table.to_lance().get_fragments()


def test_connection_is_shared_and_sessions_have_the_configured_cache_sizes(make_config, monkeypatch):
    made, connected = [], []
    real_session, real_connect = lancedb.Session, lancedb.connect

    def recording_session(**kw):
        made.append(kw)
        return real_session(**kw)

    def recording_connect(uri, **kw):
        connected.append(kw)
        return real_connect(uri, **kw)

    monkeypatch.setattr(db.lancedb, "Session", recording_session)
    monkeypatch.setattr(db.lancedb, "connect", recording_connect)
    cfg = make_config(lance_index_cache_bytes=3 * 2**20 + 1, lance_metadata_cache_bytes=5 * 2**20 + 3)
    a = connect(cfg)
    assert connect(cfg) is a and connect(make_config(**cfg.__dict__)) is a  # one connection per config
    assert made == [dict(index_cache_size_bytes=3 * 2**20 + 1, metadata_cache_size_bytes=5 * 2**20 + 3)]
    assert len(connected) == 1 and connected[0]["session"] is db.session(cfg)
    other = make_config(lance_index_cache_bytes=2**20 + 7, lance_metadata_cache_bytes=2**20 + 9)
    assert connect(other) is not a and db.session(other) is not db.session(cfg)
    assert made[-1] == dict(index_cache_size_bytes=2**20 + 7, metadata_cache_size_bytes=2**20 + 9)


def test_session_caches_stay_within_their_bounds(make_config):
    cfg = make_config(lance_index_cache_bytes=2**20, lance_metadata_cache_bytes=2**20)
    with MemoryWriter(cfg) as w:
        for s in ("a", "b"):
            put_commits(w, s, 0, 40, 2)  # 80 versions whose manifests would all be cached
        w.maintain("a")
        w.durable_chunk_index("b")
    # moka evicts asynchronously, so allow one entry's worth of slack over the two 1 MiB caches
    assert db.session(cfg).size_bytes <= 3 * 2**20


def test_versions_and_files_stay_bounded_over_passes(make_config):
    cfg = make_config(keep_versions=4, fragment_target_bytes=2**20)
    with MemoryWriter(cfg) as w:
        nxt = 0
        for _ in range(6):
            nxt = put_commits(w, "s", nxt, 8, 16)
            rep = w.maintain("s")
            assert not rep.errors, rep.errors
            table = open_chunk_table(connect(cfg), "s", DIM)
            assert len(table.list_versions()) <= cfg.keep_versions
            root = Path(dataset_uri(cfg, "s"))
            # manifests and transaction files of removed versions go with them
            assert len(list((root / "_versions").glob("*.manifest"))) <= cfg.keep_versions
            assert len(list((root / "_transactions").iterdir())) <= cfg.keep_versions
        pinned = w.pin_version("s", "ckpt")
        for _ in range(2):
            nxt = put_commits(w, "s", nxt, 8, 16)
            w.maintain("s")
        versions = {v["version"] for v in open_chunk_table(connect(cfg), "s", DIM).list_versions()}
        assert min(versions) == pinned  # a pin keeps itself and every later version
        w.unpin_version("s", "ckpt")
        nxt = put_commits(w, "s", nxt, 8, 16)
        w.maintain("s")
        assert len(open_chunk_table(connect(cfg), "s", DIM).list_versions()) <= cfg.keep_versions
        assert w.durable_chunk_index("s") == nxt - 1


def test_compaction_writes_files_of_about_the_target_and_leaves_full_ones_alone(make_config):
    """~100 MB in 1 MB commits against a 32 MiB target (the smallest whose byte cap Lance can hold, see
    compaction_options): a table of about four targets, compacted every 10 commits."""
    target, shape = 32 * 2**20, (1, 8, 64, 64)  # 64 KiB rows
    cfg = make_config(fragment_target_bytes=target, keep_versions=2, batch_size=16)
    full_seen: dict[int, int] = {}  # id -> rows of the full fragments seen after a pass
    with MemoryWriter(cfg) as w:
        nxt = 0
        while nxt < 1600:
            for _ in range(10):
                for _ in range(16):
                    w.put(make_record("s", nxt, shape=shape))
                    nxt += 1
                w.flush()
            assert not w.maintain("s").errors
            frags = fragments(cfg)
            ids = {f.metadata.id: f.metadata.physical_rows for f in frags}
            assert all(ids.get(i) == r for i, r in full_seen.items())  # a full fragment is never rewritten
            row_bytes = sum(x.file_size_bytes for f in frags for x in f.metadata.files) / sum(ids.values())
            threshold = compaction_options(cfg, row_bytes)["target_rows_per_fragment"]
            full_seen.update({i: r for i, r in ids.items() if r >= threshold})
    sizes = [sum(x.file_size_bytes for x in f.metadata.files) for f in frags]
    assert max(sizes) <= target  # data files never above the target
    ideal = math.ceil(sum(sizes) / target)
    assert ideal <= len(frags) <= 2 * ideal + 1, (len(frags), ideal, sizes)
    assert len(full_seen) >= ideal - 1 and all(r >= 0.65 * target / row_bytes for r in full_seen.values())
    assert sum(f.metadata.physical_rows for f in frags) == 1600


def test_disk_after_maintenance_within_1_2x_of_the_payload_and_the_bound(make_config):
    """2,000 rows of 6 KiB, 16 a commit, a pass every 2 commits: a day-long stream in miniature (the
    table spans ~50 fragment targets, as a tiny-preset stream-day spans ~60 of 128 MiB, and a pass merges
    a small share of it); ``keep_versions`` below the commits between passes, as by default (16 < 32)."""
    cfg = make_config(fragment_target_bytes=256 * 2**10, compact_every_n_commits=2, keep_versions=2)
    uri = dataset_uri(cfg, "s")
    with MemoryWriter(cfg) as w:
        nxt = 0
        while nxt < 2000:
            for _ in range(cfg.compact_every_n_commits):
                nxt = put_commits(w, "s", nxt, 1, 16)
                bound = disk_overhead_bound(cfg, ROW_PAYLOAD, nxt) * nxt * ROW_PAYLOAD
                assert disk_bytes(uri) <= bound, (nxt, disk_bytes(uri), bound)  # between passes too
            assert not w.maintain("s").errors
        payload = nxt * ROW_PAYLOAD
        after = disk_bytes(uri)
    assert after <= 1.2 * payload, after / payload
    assert after <= disk_overhead_bound(cfg, ROW_PAYLOAD, nxt) * payload
    assert disk_bytes(cfg.uri) >= after and disk_bytes(Path(cfg.uri) / "missing") == 0


def test_compaction_options_follow_the_target(make_config):
    big = compaction_options(make_config(), 18_688)  # default 128 MiB target, tiny-preset rows
    assert big["max_bytes_per_file"] == 120 * 2**20  # the target less one Lance page
    assert big["target_rows_per_fragment"] == int(0.95 * 120 * 2**20 / 18_688)
    small = compaction_options(make_config(fragment_target_bytes=2**20), 6_400)
    assert small["max_bytes_per_file"] == 2**20 and small["target_rows_per_fragment"] == int(0.95 * 2**20 / 6_400)
    assert compaction_options(make_config(fragment_target_bytes=1), 10**6)["target_rows_per_fragment"] == 1


def test_disk_bound_is_monotone_and_documented(make_config):
    cfg = make_config()
    assert disk_overhead_bound(cfg, ROW_PAYLOAD) > 1
    assert disk_overhead_bound(cfg, ROW_PAYLOAD, 10**4) > disk_overhead_bound(cfg, ROW_PAYLOAD, 10**6)
    assert disk_overhead_bound(cfg, ROW_PAYLOAD, 10**9) == pytest.approx(
        disk_overhead_bound(cfg, ROW_PAYLOAD), rel=1e-3
    )
    assert disk_pileup_bytes(cfg, ROW_PAYLOAD) >= 2 * cfg.fragment_target_bytes
    with pytest.raises(ValueError):
        disk_overhead_bound(cfg, 0)
