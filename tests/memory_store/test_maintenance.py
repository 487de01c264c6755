from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from memory_store.db import connect, open_chunk_table
from memory_store.retriever import Retriever
from memory_store.writer import MemoryWriter
from tests.memory_store.procs import DIM, make_embedding, make_record


def fragments(table) -> int:
    table.checkout_latest()
    return table.stats()["fragment_stats"]["num_fragments"]


def put_in_commits(w: MemoryWriter, stream_id: str, indices, per_commit: int) -> None:
    indices = list(indices)
    for i in range(0, len(indices), per_commit):
        for c in indices[i : i + per_commit]:
            w.put(make_record(stream_id, c))
        w.flush()


def test_background_compaction_keeps_fragments_few(make_config):
    cfg = make_config(compact_every_n_commits=10)
    with MemoryWriter(cfg) as w:
        put_in_commits(w, "s", range(200), per_commit=2)  # 100 tiny commits
        assert w.wait_maintenance(timeout=60)
        assert w._maintainer.passes >= 5
        table = open_chunk_table(connect(cfg), "s", DIM)
        assert fragments(table) < 20  # without compaction: 100
        assert table.count_rows() == 200


def test_cleanup_keeps_newest_and_pinned_versions(make_config):
    """Cleanup removes versions older than both the newest ``keep_versions`` and the oldest pinned
    (tagged) version; a pin therefore also keeps every later version until it is released."""
    cfg = make_config(keep_versions=3)
    with MemoryWriter(cfg) as w:
        put_in_commits(w, "s", range(8), per_commit=2)
        time.sleep(1.5)  # cleanup spares versions within a second of the oldest protected one
        put_in_commits(w, "s", range(8, 10), per_commit=2)
        pinned = w.pin_version("s", "ckpt-9")
        put_in_commits(w, "s", range(10, 30), per_commit=2)
        before = {v["version"] for v in open_chunk_table(connect(cfg), "s", DIM).list_versions()}
        report = w.maintain("s")
        assert not report.errors, report.errors
        table = open_chunk_table(connect(cfg), "s", DIM)
        after = {v["version"] for v in table.list_versions()}
        assert report.versions_removed > 0 and min(after) == pinned  # the early versions are gone
        assert after >= {v for v in before if v >= pinned}  # the pin and everything since are kept
        with Retriever(cfg) as r:
            got = r.search("s", make_embedding("s", 25), 50, before_chunk=30, version=pinned)
            assert sorted(c.chunk_index for c in got) == list(range(10))
        w.unpin_version("s", "ckpt-9")
        time.sleep(1.5)
        put_in_commits(w, "s", range(30, 40), per_commit=2)
        report = w.maintain("s")
        assert not report.errors, report.errors
        after = {v["version"] for v in open_chunk_table(connect(cfg), "s", DIM).list_versions()}
        assert pinned not in after and len(after) >= cfg.keep_versions
        assert len(after) < len(before)


def test_vector_index_built_past_threshold(make_config):
    cfg = make_config(index_threshold_rows=600, index_type="IVF_FLAT", batch_size=256)
    with MemoryWriter(cfg) as w:
        put_in_commits(w, "s", range(500), per_commit=250)
        rep = w.maintain("s")
        assert not rep.index_built  # below the threshold: exact search only
        table = open_chunk_table(connect(cfg), "s", DIM)
        assert not any("embedding" in ix.columns for ix in table.list_indices())
        assert any("chunk_index" in ix.columns for ix in table.list_indices())  # B-tree for lookups
        put_in_commits(w, "s", range(500, 700), per_commit=200)
        rep = w.maintain("s")
        assert rep.index_built and not rep.errors, rep
        table.checkout_latest()
        assert any("embedding" in ix.columns for ix in table.list_indices())
        put_in_commits(w, "s", range(700, 800), per_commit=100)
        assert not w.maintain("s").index_built  # grown by < 2x: new rows are folded in, not retrained
    with Retriever(make_config(hot_tier=False, nprobes=50)) as r:  # the indexed LanceDB path
        got = r.search("s", make_embedding("s", 650), 3, before_chunk=800)
        assert got[0].chunk_index == 650 and abs(got[0].score - 1) < 1e-3
    table.checkout_latest()
    ci = table.search().select(["chunk_index"]).to_arrow().column("chunk_index").to_numpy()
    assert np.array_equal(np.sort(ci), np.arange(800))


def test_cleanup_frees_the_files_compaction_replaced(make_config):
    """Regression: compaction commits two versions in quick succession; a cleanup cutoff a fixed second
    before the newest kept version spared the first of them, which still referenced every pre-compaction
    file, so the data directory stayed twice the live size."""
    cfg = make_config(keep_versions=1)
    shape = (2, 4, 16, 16)  # 2 KiB of float16 per chunk
    with MemoryWriter(cfg) as w:
        for i in range(300):
            w.put(make_record("s", i, shape=shape))
            if i % 10 == 9:
                w.flush()  # 30 small commits, 30 fragments
        time.sleep(1.2)  # the write versions become older than any cleanup margin
        report = w.maintain("s")
        assert not report.errors and report.fragments_after == 1, report
    data = sum(f.stat().st_size for f in (Path(cfg.uri) / "chunks_s.lance" / "data").iterdir())
    live = 300 * 2 * 4 * 16 * 16 * 2
    assert live <= data < 1.3 * live, (data, live)


def test_a_resumed_stream_reads_on_after_the_version_it_resumed_from_is_cleaned_up(make_config):
    """Regression (a 140k-frame soak): a resumed stream's tier read as of its checkpoint's version for
    good; once a later checkpoint released that version's tag, cleanup deleted the files it referenced
    and a payload read failed with "Not found". ``follow_latest`` moves it to the latest version."""
    cfg = make_config(keep_versions=1, payload_cache_bytes=1)  # no LRU: every payload is read from the store
    with MemoryWriter(cfg) as w:
        put_in_commits(w, "s", range(20), per_commit=2)  # 10 commits, 10 fragments
        resumed_at = w.pin_version("s", "ckpt-20")
    with MemoryWriter(cfg) as w, Retriever(cfg) as r:
        r.attach_writer(w)
        r.open_stream("s", version=resumed_at)
        for i in range(20, 30):
            rec = make_record("s", i)
            w.put(rec)
            r.observe(rec)
        w.pin_version("s", "ckpt-30")  # the resumed stream's own checkpoint ...
        r.follow_latest("s")
        w.unpin_version("s", "ckpt-20")  # ... replaces the one it resumed from
        time.sleep(1.2)  # cleanup spares versions within a second of the oldest protected one
        report = w.maintain("s")
        assert not report.errors and report.fragments_after == 1, report
        table = open_chunk_table(connect(cfg), "s", DIM)
        assert resumed_at not in {v["version"] for v in table.list_versions()}  # its files are gone
        got = r.search("s", make_embedding("s", 3), 2, before_chunk=30)
        assert got[0].chunk_index == 3
        assert np.array_equal(got[0].latents.float().numpy(), make_record("s", 3).latents.half().float().numpy())
