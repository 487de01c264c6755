"""Two-tier retrieval at day scale: recall and latency of the hot tier + LanceDB search against exact search.

What: one stream's day-long history (default 460,000 chunks: 24 h of the tiny preset at 16 fps, 3 frames
per chunk) searched through ``memory_store.retriever.Retriever``: the newest ``hot_tier_rows`` chunks
exactly in the in-process hot tier, the older ones through LanceDB (a flat exact scan before the vector
index exists, the index after). For each retriever config it reports recall@k of the merged two-tier
result against exact brute force (numpy float64 over every candidate embedding), for k = 2 (the tiny
preset's retrieval_k) and k = 8, the latency of ``Retriever.search`` (p50/p99, ms; payloads included, and
the LanceDB vector-search stage and the payload reads alone), the hot tier's bytes (``tier.nbytes``) and
the process RSS after the config ran.

How: the history is written once through ``MemoryWriter`` (large batches), compacted by
``MemoryWriter.maintain``, and reused by every config; only the retriever config changes. Stages:
(1) no vector index: flat exact LanceDB scan below the tier (index_threshold_rows > N), and a hot-tier-only
baseline (hot_tier_rows >= N); (2) IVF_HNSW_SQ built by ``maintain_table`` (the maintainer's path);
(3) IVF_FLAT built in its place. Configs of (2) and (3): hot_tier_rows x nprobes x refine_factor. Each
config opens a fresh Retriever (warm start of its tier from the table, empty payload LRU), runs a few
warm-up searches, then every query once per k.

Synthetic history: 64-float embeddings of a slow mean-reverting random walk (correlation time ~1000
chunks) plus per-chunk noise, in scenes of ~1500 chunks; 30% of scenes restart at the state of an earlier
chunk (a revisited place), and the last ~320 chunks revisit a scene from the first half of the day, so the
newest chunk has relevant content in both tiers. Payloads are 1x1x2x2 latents (8 B) to keep the disk small.
Queries (LongLive-RAG: the query is the newest chunk's embedding), alternating: "recent" = one of the 256
newest chunks' embeddings plus noise, "old" = a chunk below the largest hot tier plus noise. Candidates:
every chunk older than the local window (before_chunk = N - 2, exclude_recent = 1).

    python bench/two_tier.py [--rows 460000] [--queries 200] [--json FILE] [--dir DIR] [--seed 0]

With --dir the database is kept there and reused by a later run with the same --rows and --seed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LANCEDB_LOG", "error")  # LanceDB's "partition N is empty" warnings of IVF builds

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from memory_store.config import MemoryStoreConfig  # noqa: E402
from memory_store.db import connect, open_chunk_table  # noqa: E402
from memory_store.hot_tier import PayloadCache  # noqa: E402
from memory_store.maintenance import maintain_table, vector_index_config  # noqa: E402
from memory_store.retriever import Retriever  # noqa: E402
from memory_store.schema import ChunkRecord  # noqa: E402
from memory_store.writer import MemoryWriter  # noqa: E402

DIM = 64
SID = "day"
KS = (2, 8)  # the tiny preset's retrieval_k, and a larger k
WINDOW, R = 2, 1  # local window (before_chunk = N - WINDOW) and LongLive-RAG's R (exclude_recent)
PAYLOAD_SHAPE = (1, 1, 2, 2)
HOT_ROWS = (16_384, 65_536)
NPROBES = (10, 20, 50)
REFINE = (1, 4)
WARMUP = 5  # searches per config and k before the measured ones (index and table caches)
WALK_TAU = 1000.0  # correlation time of the walk, chunks
SCENE_MEAN = 1500  # mean scene length, chunks
REVISIT_P = 0.3  # share of scenes that restart at an earlier chunk's state
EMB_NOISE = 0.35  # per-dimension noise of a chunk around its walk state (state ~ N(0, 1) per dimension)
QUERY_NOISE = 0.05  # per-dimension noise of a query around its (unit) source embedding
RECENT = 16  # "recent" queries start from one of the newest RECENT chunks
LAST_SCENE = 24  # the history's last scene (a revisit of an old one) is this long
NOVEL_SHARE = 4  # Q // NOVEL_SHARE extra "novel" queries (a scene never seen): recall only


# ------------------------------------------------------------------ synthetic history and queries


def _ou_block(w0: np.ndarray, g: np.ndarray, a: float) -> np.ndarray:
    """w_t = a w_{t-1} + sqrt(1 - a^2) g_t for t = 1..L, from w0 (E,), g (L, E): closed form, float64."""
    t = np.arange(1, len(g) + 1, dtype=np.float64)[:, None]  # (L, 1)
    b = np.sqrt(1 - a * a)
    return a**t * (w0[None] + b * np.cumsum(a ** (-t) * g, axis=0))


def synth_history(n: int, seed: int) -> np.ndarray:
    """Unit embeddings (n, DIM) float32 of the scene-structured walk described in the module doc."""
    rng = np.random.default_rng(seed)
    a = 1.0 - 1.0 / WALK_TAU
    w_all = np.empty((n, DIM), dtype=np.float32)
    starts = [0]
    while starts[-1] < n:
        starts.append(starts[-1] + int(rng.geometric(1.0 / SCENE_MEAN)))
    starts = [s for s in starts if s < max(1, n - LAST_SCENE)]
    if n > 8 * LAST_SCENE:
        starts.append(n - LAST_SCENE)
    bounds = starts + [n]
    w = rng.standard_normal(DIM)
    for si, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        last = si == len(bounds) - 2 and n > 8 * LAST_SCENE
        if last:  # the newest chunks revisit a scene of the first half of the day
            w = w_all[int(rng.integers(0, n // 2))].astype(np.float64)
        elif lo > 4096 and rng.random() < REVISIT_P:
            w = w_all[int(rng.integers(0, lo - 2048))].astype(np.float64)
        for b0 in range(lo, hi, 1024):  # blocks keep a^-t small (a^-1024 ~ 2.8)
            b1 = min(hi, b0 + 1024)
            blk = _ou_block(w, rng.standard_normal((b1 - b0, DIM)), a)
            w_all[b0:b1] = blk
            w = blk[-1]
    w_all += EMB_NOISE * rng.standard_normal((n, DIM)).astype(np.float32)
    w_all /= np.linalg.norm(w_all, axis=1, keepdims=True)
    return w_all


def make_queries(x: np.ndarray, q: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """q queries alternating recent / old, then q // NOVEL_SHARE novel ones (module doc): (Q, E), kinds."""
    rng = np.random.default_rng(seed + 1)
    n = len(x)
    old_hi = n - max(HOT_ROWS) - 1024 if n > 2 * max(HOT_ROWS) else n // 2
    vecs, kinds = [], []
    for i in range(q):
        if i % 2 == 0:
            vecs.append(x[n - 1 - int(rng.integers(0, min(RECENT, n)))])
            kinds.append("recent")
        else:
            vecs.append(x[int(rng.integers(0, max(1, old_hi)))])
            kinds.append("old")
    for _ in range(q // NOVEL_SHARE):  # a walk state of its own, as far from the history as a fresh scene
        v = rng.standard_normal(DIM) + EMB_NOISE * rng.standard_normal(DIM)
        vecs.append(v / np.linalg.norm(v))
        kinds.append("novel")
    out = np.stack(vecs) + QUERY_NOISE * rng.standard_normal((len(vecs), DIM))
    return out.astype(np.float32), kinds


def exact_topk(x: np.ndarray, queries: np.ndarray, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k over chunks [0, stop) in float64, ties to the lower chunk index:
    (ids (Q, k) int64, scores (Q, k + 1) float64; the last column is the (k+1)-th score)."""
    qn = queries.astype(np.float64)
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    cand_i, cand_s = [], []
    step = 32_768
    for lo in range(0, stop, step):  # blocks of rows: the float64 copy stays small
        s = x[lo : min(stop, lo + step)].astype(np.float64) @ qn.T  # (B, Q)
        kk = min(k + 1, len(s))
        top = np.argpartition(-s, kk - 1, axis=0)[:kk]  # (kk, Q): each block's k+1 best rows per query
        cand_i.append(top + lo)
        cand_s.append(np.take_along_axis(s, top, axis=0))
    ci, sc = np.concatenate(cand_i).T, np.concatenate(cand_s).T  # (Q, blocks * (k+1))
    ids = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k + 1), dtype=np.float64)
    for qi in range(len(queries)):
        order = np.lexsort((ci[qi], -sc[qi]))[: k + 1]
        ids[qi], scores[qi] = ci[qi, order[:k]], sc[qi, order]
    return ids, scores


# ------------------------------------------------------------------ the table


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_history(uri: str, x: np.ndarray) -> dict:
    """Write x through MemoryWriter (one put per chunk, large batches), then one maintenance pass
    (compaction, version cleanup, chunk_index B-tree; no vector index yet)."""
    n = len(x)
    batch = 16_384
    cfg = MemoryStoreConfig(
        uri=uri,
        embedding_dim=DIM,
        batch_size=batch,
        queue_max=2 * batch,
        flush_interval_s=5.0,
        compact_every_n_commits=10**6,  # one explicit pass below
        index_threshold_rows=n + 1,
    )
    lat = torch.zeros(PAYLOAD_SHAPE)
    t0 = time.perf_counter()
    with MemoryWriter(cfg) as w:
        for i in range(n):
            w.put(ChunkRecord(SID, i, 3 * i, PAYLOAD_SHAPE[0], x[i], lat, "bench"))
        w.flush()
        put_s = time.perf_counter() - t0
        commits = w.stats.commits
        t1 = time.perf_counter()
        rep = w.maintain(SID)
        maintain_s = time.perf_counter() - t1
    if rep.errors:
        print("maintenance errors:", rep.errors)
    return {
        "rows": n,
        "put_to_durable_s": round(put_s, 1),
        "chunks_per_s": round(n / put_s),
        "commits": commits,
        "maintain_s": round(maintain_s, 1),
        "disk_bytes": dir_bytes(Path(uri)),
    }


def reusable(uri: str, n: int) -> bool:
    """The stream's table exists with n rows (a kept --dir); its vector index, if any, is dropped."""
    try:
        tbl = open_chunk_table(connect(MemoryStoreConfig(uri=uri, embedding_dim=DIM)), SID, DIM)
    except LookupError:
        return False
    if tbl.count_rows() != n:
        return False
    for ix in tbl.list_indices():
        if "embedding" in ix.columns:
            tbl.drop_index(ix.name)
    return True


def build_index(uri: str, n: int, index_type: str) -> float:
    """Build the vector index of ``index_type`` (replacing any); returns seconds. IVF_HNSW_SQ goes through
    maintain_table (the maintainer's path); a second type replaces it directly (maintain_table would not
    rebuild an index over an unchanged row count), with the same vector_index_config."""
    cfg = MemoryStoreConfig(uri=uri, embedding_dim=DIM, index_type=index_type, index_threshold_rows=min(n, 100_000))
    tbl = open_chunk_table(connect(cfg), SID, DIM)
    t0 = time.perf_counter()
    if not any("embedding" in ix.columns for ix in tbl.list_indices()):
        rep = maintain_table(tbl, SID, cfg)
        if rep.errors or not rep.index_built:
            raise RuntimeError(f"index build failed: {rep}")
    else:
        tbl.create_index("embedding", config=vector_index_config(cfg, tbl.count_rows()), replace=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------ one retriever config


def _timed_method(obj, name: str, acc: list[float]) -> None:
    """Wrap obj.name (an instance attribute shadowing the method) to add its wall time to acc[0]."""
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[0] += time.perf_counter() - t0

    setattr(obj, name, wrapped)


def ms(a) -> tuple[float, float]:
    a = np.asarray(a) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def rss() -> int:
    return psutil.Process().memory_info().rss


def run_config(name: str, cfg: MemoryStoreConfig, index: str, n: int, queries, kinds, truth, warmup_qs) -> dict:
    """Open a fresh Retriever with ``cfg`` (warm start of its tier), search every query once per k."""
    gc.collect()
    rss_before = rss()
    r = Retriever(cfg)
    t0 = time.perf_counter()
    tier = r.open_stream(SID)  # warm start, as a resumed generator's tier
    warm_s = time.perf_counter() - t0
    rss_open = rss()
    cold_acc, pay_acc = [0.0], [0.0]
    _timed_method(r, "_search_cold_ids", cold_acc)
    _timed_method(r, "_payloads", pay_acc)
    before = n - WINDOW
    kinds_a = np.asarray(kinds)
    main = kinds_a != "novel"  # the mix latency and the headline recall are measured over
    out: dict = {
        "config": name,
        "hot_tier_rows": cfg.hot_tier_rows,
        "index": index,
        "nprobes": cfg.nprobes if index.startswith("IVF") else None,
        "refine_factor": cfg.refine_factor if index.startswith("IVF") else None,
        "tier_floor": tier.floor,
        "warm_start_s": round(warm_s, 2),
    }
    for k in KS:
        tier.payloads = PayloadCache(cfg.payload_cache_bytes)  # each k starts with an empty payload LRU
        for q in warmup_qs:
            r.search(SID, q, k, before_chunk=before, exclude_recent=R)
        lat, cold, pay, rec, cold_want, cold_hit = [], [], [], [], [], []
        hits0, misses0 = tier.payloads.hits, tier.payloads.misses
        for qi, q in enumerate(queries):
            cold_acc[0] = pay_acc[0] = 0.0
            t0 = time.perf_counter()
            hits = r.search(SID, q, k, before_chunk=before, exclude_recent=R)
            lat.append(time.perf_counter() - t0)
            cold.append(cold_acc[0])
            pay.append(pay_acc[0])
            got = {h.chunk_index for h in hits}
            want = truth[qi, :k]
            rec.append(len(got.intersection(want.tolist())) / k)
            cw = want[want < tier.floor]
            cold_want.append(len(cw))
            cold_hit.append(len(got.intersection(cw.tolist())))
        rec_a, lat_a, cold_a, pay_a = map(np.asarray, (rec, lat, cold, pay))
        cw_a, ch_a = np.asarray(cold_want), np.asarray(cold_hit)
        lookups = tier.payloads.hits - hits0 + tier.payloads.misses - misses0
        res: dict = {}
        for kind in ("recent", "old", "novel"):
            m = kinds_a == kind
            res[f"recall_{kind}"] = float(rec_a[m].mean()) if m.any() else None
            res[f"cold_share_{kind}"] = float(cw_a[m].sum() / (k * m.sum())) if m.any() else None
        p50, p99 = ms(lat_a[main])
        out[f"k{k}"] = {
            "recall": float(rec_a[main].mean()),
            **res,
            "queries_below_full_recall": int((rec_a[main] < 1).sum()),
            "cold_recall": float(ch_a[main].sum() / cw_a[main].sum()) if cw_a[main].sum() else None,
            "cold_recall_novel": float(ch_a[~main].sum() / cw_a[~main].sum()) if cw_a[~main].sum() else None,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": float(lat_a[main].max() * 1e3),
            "lancedb_p50_ms": ms(cold_a[main])[0],
            "lancedb_p99_ms": ms(cold_a[main])[1],
            "payload_p50_ms": ms(pay_a[main])[0],
            "payload_p99_ms": ms(pay_a[main])[1],
            "novel_p50_ms": ms(lat_a[~main])[0] if (~main).any() else None,
            "payload_lru_hit_rate": (tier.payloads.hits - hits0) / lookups if lookups else None,
        }
    out["tier_bytes"] = tier.nbytes
    out["payload_cache_bytes"] = r.memory_bytes()["payload_cache"]
    out["rss_before_bytes"] = rss_before
    out["rss_open_bytes"] = rss_open
    out["rss_bytes"] = rss()
    r.close()
    del r, tier
    gc.collect()
    out["rss_closed_bytes"] = rss()
    out["load_avg_1m"] = os.getloadavg()[0]
    return out


def f2(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_tables(results: list[dict], n: int, q: int) -> None:
    rows = []
    for c in results:
        a, b = c["k2"], c["k8"]
        rows.append(
            [
                c["config"],
                f"{c['hot_tier_rows']:,}",
                c["index"],
                c["nprobes"] or "-",
                c["refine_factor"] or "-",
                f2(a["recall"]),
                f2(b["recall"]),
                f2(b["cold_recall"]),
                f"{a['p50_ms']:.1f}",
                f"{a['p99_ms']:.1f}",
                f"{b['p50_ms']:.1f}",
                f"{b['p99_ms']:.1f}",
                f"{a['lancedb_p50_ms']:.1f}",
                f"{a['payload_p50_ms']:.1f}",
                f"{c['tier_bytes'] / 2**20:.1f}",
                f"{c['rss_bytes'] / 2**20:.0f}",
            ]
        )
    table(
        f"Two-tier search over {n:,} chunks vs exact float64 ({q} queries per k, half recent, half old; latency ms "
        f"of Retriever.search with payloads; 'LanceDB' and 'payload' are those stages alone, k=2; RSS after)",
        [
            "config",
            "hot rows",
            "index",
            "nprobes",
            "refine",
            "recall@2",
            "recall@8",
            "cold recall@8",
            "k=2 p50",
            "k=2 p99",
            "k=8 p50",
            "k=8 p99",
            "LanceDB p50",
            "payload p50",
            "tier MB",
            "RSS MB",
        ],
        rows,
    )
    rows = []
    for c in results:
        a, b = c["k2"], c["k8"]
        rows.append(
            [
                c["config"],
                f"{f2(a['recall_recent'])}/{f2(b['recall_recent'])}",
                f"{f2(a['recall_old'])}/{f2(b['recall_old'])}",
                f"{b['cold_share_recent']:.2f}/{b['cold_share_old']:.2f}",
                f"{f2(a['recall_novel'])}/{f2(b['recall_novel'])}",
                f"{b['cold_share_novel']:.2f}",
                f"{a['queries_below_full_recall']}/{b['queries_below_full_recall']}",
                f"{a['max_ms']:.0f}/{b['max_ms']:.0f}",
                f"{a['lancedb_p99_ms']:.1f}",
                f"{a['payload_p99_ms']:.1f}",
                f2(a["payload_lru_hit_rate"]),
                c["warm_start_s"],
                "/".join(f"{c[key] / 2**20:.0f}" for key in ("rss_before_bytes", "rss_open_bytes", "rss_closed_bytes")),
                f"{c['load_avg_1m']:.1f}",
            ]
        )
    table(
        "By query kind (k=2/k=8), tails, memory. 'below floor': share of the exact top-8 in the cold tier; "
        "novel: queries from a scene never seen (recall only, not in the headline mix)",
        [
            "config",
            "recall recent",
            "recall old",
            "top-8 below floor recent/old",
            "recall novel",
            "novel top-8 below floor",
            "queries < full recall",
            "max ms",
            "LanceDB p99 k=2",
            "payload p99 k=2",
            "payload LRU hits k=2",
            "warm start s",
            "RSS MB before/open/closed",
            "load 1m",
        ],
        rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=460_000, help="history chunks N (default: a day of the tiny preset)")
    p.add_argument("--queries", type=int, default=200, help="queries per config and k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--dir", default=None, help="database directory, kept and reused (default: a temp dir, removed)")
    args = p.parse_args()
    if args.rows < 1024:
        p.error("--rows must be >= 1024")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    n, t_start = args.rows, time.perf_counter()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="two-tier-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    uri = str(root / f"db-{n}-{args.seed}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load avg {os.getloadavg()[0]:.2f}"
    )
    try:
        t0 = time.perf_counter()
        x = synth_history(n, args.seed)
        queries, kinds = make_queries(x, args.queries, args.seed)
        warmup_qs = make_queries(x, WARMUP, args.seed + 100)[0][:WARMUP]
        truth, tscores = exact_topk(x, queries, n - WINDOW - R, max(KS))
        synth_s = time.perf_counter() - t0
        gaps = tscores[:, 1:] - tscores[:, :-1]  # consecutive exact scores (<= 0)
        print(
            f"history + queries + exact top-{max(KS)}: {synth_s:.1f} s; smallest gap between consecutive exact "
            f"top-{max(KS) + 1} scores {float(-gaps.max()):.2e}"
        )
        if args.dir and reusable(uri, n):
            build = {"rows": n, "reused": True, "disk_bytes": dir_bytes(Path(uri))}
        else:
            shutil.rmtree(uri, ignore_errors=True)
            build = build_history(uri, x)
        del x
        print(f"table: {build}")
        results: list[dict] = []
        base = dict(uri=uri, embedding_dim=DIM)

        def go(name, index, **over):
            t1 = time.perf_counter()
            res = run_config(name, MemoryStoreConfig(**base, **over), index, n, queries, kinds, truth, warmup_qs)
            results.append(res)
            print(
                f"  {name:<28} recall@2 {res['k2']['recall']:.3f} recall@8 {res['k8']['recall']:.3f} "
                f"p50 {res['k2']['p50_ms']:.1f} ms ({time.perf_counter() - t1:.0f} s)",
                flush=True,
            )

        # (1) no vector index: exact flat scan below the tier; and the whole history in the hot tier
        for hot in HOT_ROWS:
            go(f"flat hot={hot // 1024}k", "flat (exact)", hot_tier_rows=hot, index_threshold_rows=n + 1)
        go("hot tier only", "none (hot only)", hot_tier_rows=n)
        # (2), (3): the vector indices
        index_s = {}
        for index_type in ("IVF_HNSW_SQ", "IVF_FLAT"):
            index_s[index_type] = round(build_index(uri, n, index_type), 1)
            print(f"{index_type} built in {index_s[index_type]} s")
            for hot in HOT_ROWS:
                for nprobes in NPROBES:
                    for refine in REFINE:
                        go(
                            f"{index_type} hot={hot // 1024}k np={nprobes} rf={refine}",
                            index_type,
                            hot_tier_rows=hot,
                            index_type=index_type,
                            nprobes=nprobes,
                            refine_factor=refine,
                        )
        build["index_build_s"] = index_s
        build["disk_bytes_with_index"] = dir_bytes(Path(uri))
        total_s = time.perf_counter() - t_start
        print_tables(results, n, args.queries)
        print(f"\ntotal {total_s:.0f} s; load avg at the end {os.getloadavg()[0]:.2f}")
        if args.json:
            doc = {
                "command": " ".join(["python", "bench/two_tier.py", *sys.argv[1:]]),
                "machine": {
                    "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                },
                "rows": n,
                "queries": args.queries,
                "ks": list(KS),
                "build": build,
                "total_s": round(total_s, 1),
                "configs": results,
            }
            Path(args.json).write_text(json.dumps(doc, indent=1))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
