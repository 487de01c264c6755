"""Memory store benchmark: retrieval latency of the hot tier and of the LanceDB path at 1k..1M history
chunks, write throughput, bytes on disk per chunk, and retrieval time as a share of tiny-preset chunk
generation with and without prefetch.

    python bench/memory_store.py [--quick] [--sizes 1000,10000,100000,1000000] [--chunk-ms MS] [--dir DIR]

Synthetic history: 64-float embeddings drawn around slowly drifting "scene" centres (like a video's),
queries a slow random walk from a stored chunk (consecutive chunks ask similar questions). Payloads are
tiny-preset chunks (3 x 3 x 32 x 32 float16 = 18 KB) up to 10k rows and 1 x 3 x 8 x 8 (384 B) above, so
that the 1M-row table fits a laptop disk. Prints tables; figures go to docs with machine, date, command.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from memory_store.config import MemoryStoreConfig  # noqa: E402
from memory_store.db import connect, fetch_chunks, open_chunk_table  # noqa: E402
from memory_store.hot_tier import HotTier  # noqa: E402
from memory_store.maintenance import maintain_table  # noqa: E402
from memory_store.retriever import Retriever  # noqa: E402
from memory_store.schema import ChunkRecord, EncodedChunk, encoded_to_table, payload_checksum  # noqa: E402
from memory_store.writer import MemoryWriter  # noqa: E402

DIM, K, WINDOW, R = 64, 6, 2, 1  # embedding size, top-k, local window (chunks), LongLive-RAG's R
TINY_SHAPE, SMALL_SHAPE = (3, 3, 32, 32), (1, 3, 8, 8)


def pct(ts_s: list[float]) -> tuple[str, str]:
    a = np.asarray(ts_s) * 1e3
    return f"{np.percentile(a, 50):.2f}", f"{np.percentile(a, 99):.2f}"


def timed(fn, n: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def synth_embeddings(n: int, seed: int = 0) -> np.ndarray:
    """Unit rows around slowly drifting scene centres: row i belongs to scene i // 500."""
    rng = np.random.default_rng(seed)
    n_scenes = max(1, -(-n // 500))
    centres = np.cumsum(rng.standard_normal((n_scenes, DIM)).astype(np.float32) * 0.5, axis=0)
    centres += rng.standard_normal((n_scenes, DIM)).astype(np.float32)
    x = np.repeat(centres, 500, axis=0)[:n] + rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def query_walk(x: np.ndarray, n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    q = x[int(rng.integers(len(x)))].copy()
    out = []
    for _ in range(n):
        q = q + 0.05 * rng.standard_normal(DIM).astype(np.float32)
        q /= np.linalg.norm(q)
        out.append(q.copy())
    return out


# ------------------------------------------------------------------ hot tier


def bench_hot(sizes: list[int], n_queries: int) -> None:
    rows = []
    for n in sizes:
        x = synth_embeddings(n)
        qs = query_walk(x, n_queries)
        res = []
        for qmin in (32768, 10**12):  # default (int8 two-stage above 32k rows) vs float32 only
            tier = HotTier(DIM, capacity_hint=n, quantize_min_rows=qmin)
            tier.extend(np.arange(n), x)
            it = iter(qs * 2)
            res.append(pct(timed(lambda t=tier, it=it, n=n: t.topk(next(it), K, n - WINDOW - R), n_queries)))
            del tier
        rows.append([f"{n:,}", *res[0], *res[1], f"{n * DIM * 4 / 2**20:.0f}"])
    table(
        f"Hot tier exact top-{K} (E={DIM}, {torch.get_num_threads()} threads), ms",
        ["history chunks", "p50", "p99", "fp32-only p50", "fp32-only p99", "fp32 matrix MB"],
        rows,
    )


# ------------------------------------------------------------------ LanceDB path


def build_table(cfg: MemoryStoreConfig, stream_id: str, x: np.ndarray, shape) -> float:
    """Append len(x) synthetic chunks in one big append, then one maintenance pass (B-tree, and the
    vector index past cfg.index_threshold_rows, as the writer's maintainer would). Returns seconds."""
    t0 = time.perf_counter()
    db = connect(cfg)
    table_ = open_chunk_table(db, stream_id, DIM, create=True)
    rng = np.random.default_rng(0)
    created = datetime.now(UTC)
    parts = []
    for lo in range(0, len(x), 100_000):
        hi = min(len(x), lo + 100_000)
        payloads = rng.standard_normal((hi - lo, *shape)).astype(np.float16)  # distinct: no dictionary coding
        batch = []
        for i in range(lo, hi):
            p = payloads[i - lo].tobytes()
            batch.append(
                EncodedChunk(
                    stream_id, i, i * shape[0], shape[0], x[i], p, shape, "bench", created, payload_checksum(p, shape)
                )
            )
        parts.append(encoded_to_table(batch, table_.schema))
    table_.add(pa.concat_tables(parts))  # one append: full-size fragments, nothing to compact
    rep = maintain_table(table_, stream_id, cfg)
    if rep.errors:
        print("maintenance errors:", rep.errors)
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_lancedb(sizes: list[int], n_queries: int, root: Path) -> Path:
    rows = []
    last_uri = root
    for n in sizes:
        shape = TINY_SHAPE if n <= 10_000 else SMALL_SHAPE
        uri = root / f"db-{n}"
        cfg = MemoryStoreConfig(uri=str(uri), embedding_dim=DIM)
        x = synth_embeddings(n)
        build_s = build_table(cfg, "bench", x, shape)
        qs = query_walk(x, n_queries)
        with Retriever(MemoryStoreConfig(uri=str(uri), embedding_dim=DIM, hot_tier=False)) as cold:
            it = iter(qs * 2)
            cold_t = timed(
                lambda c=cold, it=it, n=n: c.search("bench", next(it), K, before_chunk=n - WINDOW, exclude_recent=R),
                n_queries,
            )
            got = cold.search("bench", qs[0], K, before_chunk=n - WINDOW, exclude_recent=R)
        t0 = time.perf_counter()
        tier = HotTier.from_lancedb(cfg, "bench")
        warm_s = time.perf_counter() - t0
        exact = tier.topk(qs[0], K, n - WINDOW - R).chunk_indices
        recall = len(set(exact.tolist()) & {c.chunk_index for c in got}) / K
        tbl = open_chunk_table(connect(cfg), "bench", DIM)
        it = iter(qs * 2)

        def hot_miss(t=tier, tb=tbl, it=it, n=n):  # top-k in the hot tier, payloads fetched from LanceDB
            hits = t.topk(next(it), K, n - WINDOW - R)
            fetch_chunks(tb, "bench", hits.chunk_indices.tolist())

        miss_t = timed(hot_miss, n_queries)
        indexed = any("embedding" in ix.columns for ix in tbl.list_indices())
        per_chunk = dir_bytes(uri) / n
        rows.append(
            [
                f"{n:,}",
                "x".join(map(str, shape)),
                *pct(cold_t),
                f"{recall:.2f}",
                "IVF_HNSW_SQ" if indexed else "flat (exact)",
                *pct(miss_t),
                f"{per_chunk:,.0f}",
                f"{build_s:.1f}",
                f"{warm_s:.2f}",
            ]
        )
        del tier
        last_uri = uri
    table(
        f"LanceDB path, top-{K} with payloads (checksums verified), ms",
        [
            "history chunks",
            "payload",
            "search p50",
            "search p99",
            "recall@6",
            "index",
            "hot+fetch p50",
            "hot+fetch p99",
            "disk B/chunk",
            "build s",
            "warm start s",
        ],
        rows,
    )
    return last_uri


# ------------------------------------------------------------------ writes


def bench_writes(root: Path, n_chunks: int) -> None:
    rows = []
    rng = np.random.default_rng(0)
    lat = torch.from_numpy(rng.standard_normal((n_chunks, *TINY_SHAPE)).astype(np.float32))
    emb = synth_embeddings(n_chunks)
    for preset in ("tiny", "wan-1.3b"):
        uri = root / f"writes-{preset}"
        cfg = MemoryStoreConfig.from_name(preset, uri=str(uri), embedding_dim=DIM)
        t0 = time.perf_counter()
        with MemoryWriter(cfg) as w:
            for i in range(n_chunks):
                w.put(ChunkRecord("w", i, 3 * i, 3, emb[i], lat[i], "bench"))
            w.flush()
            put_s = time.perf_counter() - t0
            stats = w.stats
        # steady state: compacted, and every version but the newest cleaned
        time.sleep(1.2)  # the cleanup cutoff may sit up to a second before the newest kept version
        tbl = open_chunk_table(connect(cfg), "w", DIM)
        maintain_table(tbl, "w", MemoryStoreConfig.from_name(preset, uri=str(uri), embedding_dim=DIM, keep_versions=1))
        rows.append(
            [
                preset,
                f"{n_chunks:,}",
                f"{n_chunks / put_s:,.0f}",
                stats.commits,
                f"{n_chunks / max(stats.commits, 1):.1f}",
                f"{dir_bytes(uri) / n_chunks:,.0f}",
            ]
        )
    table(
        "Writer throughput, tiny-preset chunks (3x3x32x32 float16 = 18,432 B payload), put -> durable",
        ["config preset", "chunks", "chunks/s", "commits", "chunks/commit", "disk B/chunk (compacted, cleaned)"],
        rows,
    )


def bench_commit_at_scale(uri: Path, n_rows: int) -> None:
    """merge_insert of one 32-chunk batch into the largest table: the writer's per-commit cost there."""
    cfg = MemoryStoreConfig(uri=str(uri), embedding_dim=DIM)
    w = MemoryWriter(cfg)
    emb = synth_embeddings(32, seed=7)
    lat = torch.zeros(SMALL_SHAPE)
    ts = []
    for b in range(8):
        t0 = time.perf_counter()
        for i in range(32):
            w.put(ChunkRecord("bench", n_rows + 32 * b + i, 0, 1, emb[i], lat, "bench"))
        w.flush()
        ts.append(time.perf_counter() - t0)
    w.close()
    p50, p99 = pct(ts[2:])
    table(
        f"Commit of a 32-chunk batch into a {n_rows:,}-row table (merge_insert, scan join), ms",
        ["p50", "p99"],
        [[p50, p99]],
    )


# ------------------------------------------------------------------ share of chunk generation


def chunk_stepper(chunk_ms: float | None):
    """(step() -> latents, description): a real tiny-preset generator when importable."""
    if chunk_ms is None:
        try:
            from workers.config import ModelConfig
            from workers.generator import Generator
            from workers.types import StreamSpec

            gen = Generator(ModelConfig.from_name("tiny"))
            state = gen.new_stream(StreamSpec("bench", seed=1))
            return (lambda: gen.step([state])[0].latents), "tiny-preset Generator.step (measured)"
        except ImportError as e:
            print(f"workers.generator not importable ({e}); pass --chunk-ms for a synthetic chunk")
            chunk_ms = 100.0
    a = torch.randn(256, 256)
    reps = max(1, int(chunk_ms / 1.0))

    def synthetic():
        for _ in range(reps):
            a @ a
        return torch.randn(TINY_SHAPE)

    return synthetic, f"synthetic {chunk_ms} ms workload"


def bench_share(uri: Path, n_rows: int, chunk_ms: float | None, n_chunks: int, root: Path, threads: list[int]) -> None:
    """Per-chunk wall time of a rollout loop (generate, embed, publish) with no retrieval, a blocking
    retrieval, and a prefetched one. Modes rotate chunk by chunk so a shared machine's drift hits all
    alike; medians are compared."""
    from memory_store.embedders import PooledProjectionEmbedder

    step, what = chunk_stepper(chunk_ms)
    embedder = PooledProjectionEmbedder(3, DIM)
    retriever = Retriever(MemoryStoreConfig(uri=str(uri), embedding_dim=DIM))
    tier = retriever.open_stream("bench")  # warm start: the n_rows-chunk history in the hot tier
    x_q = query_walk(synth_embeddings(min(n_rows, 20_000)), 4 * n_chunks * len(threads) + 8, seed=3)
    out = MemoryWriter(MemoryStoreConfig.from_name("tiny", uri=str(root / "share-out"), embedding_dim=DIM))
    qi = iter(x_q)
    kw = dict(before_chunk=n_rows - WINDOW, exclude_recent=R)
    modes = ["none", "inline", "prefetch-during-publish", "prefetch-during-generation"]
    rows = []
    threads_before = torch.get_num_threads()
    for nt in threads:
        torch.set_num_threads(nt)
        per: dict[str, list[float]] = {m: [] for m in modes}
        search_t: list[float] = []

        def one_chunk(i: int, mode: str, per=per, search_t=search_t) -> None:
            fut = None
            t0 = time.perf_counter()
            if mode == "prefetch-during-generation":  # query of the previous chunk: one chunk stale
                fut = retriever.prefetch("bench", next(qi), K, **kw)
            lat = step()
            e = embedder.embed(lat)
            if mode == "inline":
                t1 = time.perf_counter()
                retriever.search("bench", next(qi), K, **kw)
                search_t.append(time.perf_counter() - t1)
            elif mode == "prefetch-during-publish":  # exact: the query is the chunk just generated
                fut = retriever.prefetch("bench", next(qi), K, **kw)
            out.put(ChunkRecord("gen", i, 3 * i, 3, e, lat, "bench"))  # publish
            if fut is not None:
                fut.result()
            per[mode].append(time.perf_counter() - t0)

        for i in range(3):  # warm-up
            one_chunk(i, "none")
        per["none"].clear()
        for i in range(4 * n_chunks):
            one_chunk(i, modes[i % 4])
        base = float(np.median(per["none"]))
        for m in modes:
            med = float(np.median(per[m]))
            rows.append([nt, m, f"{med * 1e3:.1f}", f"{100 * (med - base) / base:+.2f}%"])
        s50, _ = pct(search_t)
        rows.append([nt, "(search alone, p50)", s50, f"{100 * float(s50) / (base * 1e3):.2f}% of a chunk"])
    torch.set_num_threads(threads_before)
    hit = tier.payloads.hits / max(1, tier.payloads.hits + tier.payloads.misses)
    out.close()
    retriever.close()
    table(
        f"Retrieval vs chunk generation ({what}; hot tier of {n_rows:,} chunks, top-{K} + payloads, "
        f"payload LRU hit rate {hit:.2f}; {n_chunks} chunks per mode)",
        ["torch threads", "mode", "median ms per chunk", "cost vs no retrieval"],
        rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1k and 10k rows only, fewer queries")
    p.add_argument("--sizes", default=None, help="comma-separated history sizes")
    p.add_argument("--queries", type=int, default=None, help="queries per LanceDB-path measurement")
    p.add_argument("--hot-queries", type=int, default=None, help="queries per hot-tier measurement")
    p.add_argument("--chunk-ms", type=float, default=None, help="synthetic chunk time instead of the generator")
    p.add_argument("--dir", default=None, help="where to build the databases (default: a temp dir, removed)")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000])
    )
    n_queries = args.queries or (50 if args.quick else 300)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="memstore-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load avg {os.getloadavg()[0]:.2f}"
    )
    try:
        bench_hot(sizes, args.hot_queries or (200 if args.quick else 1000))
        largest = bench_lancedb(sizes, n_queries, root)
        bench_writes(root, 1000 if args.quick else 5000)
        bench_commit_at_scale(largest, sizes[-1])
        bench_share(largest, sizes[-1], args.chunk_ms, 10 if args.quick else 50, root, [2, 1])
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nload avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
