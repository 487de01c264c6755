"""End-to-end cost of retrieval memory: what one generated chunk costs with and without it.

    python bench/retrieval_cost.py [--chunks 24] [--warmup 8] [--rounds 5] [--streams 1,4] [--threads 1]
                                   [--flush-interval S] [--json FILE]

Tiny preset, seeded random init (every configuration runs the same weights; checked by hash), one
and four streams. Three configurations, each with a ``workers.memory.MemoryLink`` in a fresh temporary
database, since a worker publishes every chunk whenever it has a memory store, whatever the memory mode:

    window     cfg.memory="window", the preset's window
    retrieval  cfg.memory="retrieval": search (prefetched) + encode of newly retrieved chunks + memory slots
    window+M   cfg.memory="window" with window_frames + memory_frames: the same attention context as
               retrieval, without the memory system (the fair baseline for "attention over memory slots")

torch runs one intra-op thread by default, as a worker does (``WorkerSettings.threads``); with two
threads on two busy cores OpenMP's barriers make every forward many times slower, which would swamp
what is measured here. Per run: a new Generator, new streams (same seeds every run), ``--warmup``
untimed chunks (the window and memory slots fill), then ``--chunks`` timed steps of ``Generator.step``
+ ``MemoryLink.publish`` of every chunk, as a worker does. Time per chunk = (step + publish) / streams.
Runs are interleaved: every round runs every (configuration, streams) once, in an order rotated per
round, so that load from elsewhere on the machine hits all of them alike; tables give the median and
the best (lowest) over rounds of each run's mean.

Breakdown (instance-level wrappers installed by this script only; product code is unchanged):
  search wait   time in ``Generator._retrieve`` (waiting for the prefetched ``memory.search`` future)
  encode        ``family.forward`` calls made inside ``Generator._refresh_memory`` (sigma=0 against the
                sink, one per retrieved chunk missing from the encoded-row LRU)
  refresh rest  the rest of ``_refresh_memory`` (slot assignment, LRU import/export, contexts)
  denoise       the sampler's ``family.forward`` calls; recache: the sigma=0 pass that writes the window
  publish       ``MemoryLink.publish`` in the caller (retriever.observe + writer.put)
  memory attn   estimate: window+M minus window (the larger context, with no memory system)
  background    CPU time of the store's threads during the timed steps (memory-writer, memory-maintainer,
                LanceDB's runtime threads, the retriever's prefetch thread), read per thread from
                /proc/self/task ("ended_threads": threads that ended during the timed steps, which
                only the process total still counts); on 2 cores it competes with the model for CPU
Every component is timed twice: wall time, and CPU time of the calling (main) thread. With one torch
thread the main thread does all the model's work, so its CPU time is not inflated by other processes
taking the cores; on a shared machine read the CPU tables, the wall ones carry the machine's load.
Counts: encodes per chunk, LRU lookups (retrieved chunks whose set changed), LRU hit rate, and
re-encodes (chunks encoded again after the LRU dropped them).

"memory-system overhead" = search wait + encode + refresh rest + publish (caller wall time), the same
plus background store CPU, as % of the retrieval chunk time, and (CPU only) as % of all the process's
CPU (the project goal: at most 3% on a GPU worker; this script reports the CPU figures).

The default run takes about 5 minutes on 2 idle cores (under 7 on 2 cores shared with other jobs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog  # noqa: E402
import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.generator import Generator  # noqa: E402
from workers.memory import MemoryLink, default_embedder  # noqa: E402
from workers.types import StreamSpec  # noqa: E402

CONFIG_NAMES = ("window", "retrieval", "window+M")
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def model_config(name: str) -> ModelConfig:
    base = ModelConfig.from_name("tiny")
    if name == "window":
        return ModelConfig.from_name("tiny", memory="window")
    if name == "retrieval":
        return ModelConfig.from_name("tiny", memory="retrieval")
    if name == "window+M":
        return ModelConfig.from_name("tiny", memory="window", window_frames=base.window_frames + base.memory_frames)
    raise ValueError(name)


def context_frames(cfg: ModelConfig) -> int:
    """Frames a chunk attends over once the caches are full: sink | memory | window | chunk."""
    mem = cfg.memory_frames if cfg.memory == "retrieval" else 0
    return cfg.sink_frames + mem + cfg.window_frames + cfg.frames_per_chunk


def weights_digest(gen: Generator) -> str:
    h = hashlib.sha256()
    for k, v in sorted(gen.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- per-thread CPU (Linux /proc) ------------------------------------------------------------
def thread_cpu() -> dict[int, tuple[str, float]]:
    """tid -> (comm, user+system CPU seconds) of every live thread of this process."""
    out = {}
    base = "/proc/self/task"
    if not os.path.isdir(base):
        return out
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / _CLK)
    return out


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system  # includes threads that already ended


def classify_threads(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per category between two snapshots.

    compute: the main thread and torch's intra-op workers (threads the threading module does not know,
    named like the process); prefetch: the retriever's search thread; store: writer, maintainer and
    LanceDB's threads, plus any thread that ended between the snapshots (only the process total has it).
    """
    py = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    main_comm = after.get(os.getpid(), ("python", 0.0))[0]
    cats: dict[str, float] = defaultdict(float)
    for tid, (comm, cpu) in after.items():
        d = cpu - before.get(tid, (comm, 0.0))[1]
        name = py.get(tid)
        if tid == os.getpid():
            cats["main"] += d
        elif name is not None and name.startswith("retriever-prefetch"):
            cats["prefetch"] += d
        elif name is not None and name.startswith("memory-writer"):
            cats["writer"] += d
        elif name is not None and name.startswith("memory-maintainer"):
            cats["maintainer"] += d
        elif name is None and comm == main_comm:
            cats["torch_workers"] += d
        else:  # LanceDB event loop / tokio / lance-cpu threads, jemalloc, other Python threads
            cats["lancedb"] += d
    return cats


# ---- instrumentation -------------------------------------------------------------------------
class Probe:
    """Wraps a generator's and a link's methods (on the instances) to time the parts of a step."""

    def __init__(self, gen: Generator, link: MemoryLink):
        self.gen, self.link = gen, link
        self.t: dict[str, float] = defaultdict(float)  # wall seconds
        self.c: dict[str, float] = defaultdict(float)  # CPU seconds of the calling (main) thread
        self.n: dict[str, int] = defaultdict(int)
        self.on = False  # count only the timed steps
        self._in_refresh = False
        self._last_hits: list = []
        self._encoded: dict[str, set[int]] = defaultdict(set)  # every chunk ever encoded, per stream
        fwd, retrieve, refresh, publish = gen.family.forward, gen._retrieve, gen._refresh_memory, link.publish

        def forward(x, sigma, states, actions, ctxs, need_output=True):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = fwd(x, sigma, states, actions, ctxs, need_output=need_output)
            if self.on:
                key = "encode" if self._in_refresh else ("denoise" if need_output else "recache")
                self.t[key] += time.perf_counter() - t0
                self.c[key] += time.thread_time() - c0
                self.n[key] += 1
            return out

        def _retrieve(state):
            t0, c0 = time.perf_counter(), time.thread_time()
            hits = retrieve(state)
            if self.on:
                self.t["search_wait"] += time.perf_counter() - t0
                self.c["search_wait"] += time.thread_time() - c0
                self.n["searches"] += 1
            self._last_hits = hits
            return hits

        def _refresh_memory(state):
            before = state.memory_chunks
            self._last_hits = []
            lru = gen._memory_rows.get(state.stream_id, {})
            cached = set(lru)
            n_enc = self.n["encode"]
            self._in_refresh = True
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                refresh(state)
            finally:
                self._in_refresh = False
            if not self.on:
                for c in state.memory_chunks:
                    self._encoded[state.stream_id].add(c)
                return
            self.t["refresh"] += time.perf_counter() - t0
            self.c["refresh"] += time.thread_time() - c0
            chosen = tuple(sorted(h.chunk_index for h in self._last_hits))
            if self._last_hits and chosen != before:
                self.n["lookups"] += len(chosen)
                self.n["lru_hits"] += sum(c in cached for c in chosen)
                self.n["refreshes"] += 1
                seen = self._encoded[state.stream_id]
                self.n["re_encodes"] += sum(c not in cached and c in seen for c in chosen)
                seen.update(chosen)
            self.n["encode_check"] += (self.n["encode"] - n_enc) != sum(
                c not in cached for c in chosen if chosen != before
            )

        def _publish(chunk):
            t0, c0 = time.perf_counter(), time.thread_time()
            publish(chunk)
            if self.on:
                self.t["publish"] += time.perf_counter() - t0
                self.c["publish"] += time.thread_time() - c0
                self.n["publish"] += 1

        gen.family.forward = forward
        gen._retrieve = _retrieve
        gen._refresh_memory = _refresh_memory
        link.publish = _publish


def run_once(name: str, n_streams: int, args, root: Path, idx: int) -> dict:
    """One run: fresh link and generator, warmup chunks, then the timed steps."""
    cfg = model_config(name)
    db = root / f"run{idx:03d}"
    overrides = {} if args.flush_interval is None else {"flush_interval_s": args.flush_interval}
    link = MemoryLink(str(db), cfg, **overrides)
    gen = Generator(cfg, memory=link.retriever, embedder=default_embedder(cfg))
    probe = Probe(gen, link)
    specs = [StreamSpec(f"s{i}", seed=1000 + i, prompt=f"stream {i}") for i in range(n_streams)]
    states = [gen.new_stream(s) for s in specs]
    if cfg.memory == "retrieval":  # as GeneratorWorkerImpl does for a retrieval stream
        for s in specs:
            link.open_stream(s.stream_id)

    def step():
        for c in gen.step(states):
            link.publish(c)

    try:
        for _ in range(args.warmup):
            step()
        probe.on = True
        ws = link.writer.stats
        w0 = (ws.commits, ws.chunks_committed, link.writer._maintainer.passes)
        th0, p0 = thread_cpu(), process_cpu()
        step_s, step_cpu = [], 0.0
        for _ in range(args.chunks):
            t0, c0 = time.perf_counter(), time.thread_time()
            step()
            step_s.append(time.perf_counter() - t0)
            step_cpu += time.thread_time() - c0
        th1, p1 = thread_cpu(), process_cpu()
        probe.on = False
        cats = classify_threads(th0, th1)
        known = sum(cats.values())
        cats["ended_threads"] = max(0.0, (p1 - p0) - known)  # only the process total has them (LanceDB's)
        writer = dict(
            commits=ws.commits - w0[0],
            chunks_committed=ws.chunks_committed - w0[1],
            maintenance_passes=link.writer._maintainer.passes - w0[2],
        )  # during the timed steps
        digest = weights_digest(gen)
    finally:
        link.close()
        shutil.rmtree(db, ignore_errors=True)

    n_chunks = args.chunks * n_streams

    def parts(seconds: dict[str, float], total_s: float) -> dict[str, float]:
        ms = {k: v * 1e3 / n_chunks for k, v in seconds.items()}
        out = {k: ms.get(k, 0.0) for k in ("denoise", "recache", "search_wait", "encode", "publish")}
        out["refresh_rest"] = ms.get("refresh", 0.0) - out["search_wait"] - out["encode"]
        out["other"] = total_s * 1e3 / n_chunks - sum(out.values())
        out["total"] = total_s * 1e3 / n_chunks
        return out

    n = dict(probe.n)
    return dict(
        config=name, streams=n_streams, chunks=n_chunks, weights=digest, context_frames=context_frames(cfg),
        ms_per_chunk=parts(probe.t, sum(step_s)), main_cpu_ms_per_chunk=parts(probe.c, step_cpu),
        step_ms=[s * 1e3 for s in step_s],
        cpu_ms_per_chunk={k: v * 1e3 / n_chunks for k, v in cats.items()},
        counts=n, writer=writer,
        ms_per_call={k: probe.t[k] * 1e3 / probe.n[k] for k in ("denoise", "recache", "encode") if probe.n.get(k)},
        cpu_ms_per_call={k: probe.c[k] * 1e3 / probe.n[k] for k in ("denoise", "recache", "encode") if probe.n.get(k)},
    )  # fmt: skip


# ---- summary ---------------------------------------------------------------------------------
def med(xs):
    return statistics.median(xs) if xs else 0.0


def summarize(runs: list[dict]) -> dict:
    out = {}
    groups = defaultdict(list)
    for r in runs:
        groups[(r["streams"], r["config"])].append(r)
    for (b, name), rs in sorted(groups.items()):
        keys = rs[0]["ms_per_chunk"].keys()
        cpu_keys = sorted({k for r in rs for k in r["cpu_ms_per_chunk"]})
        cnt = defaultdict(int)
        for r in rs:
            for k, v in r["counts"].items():
                cnt[k] += v
        chunks = sum(r["chunks"] for r in rs)
        out.setdefault(str(b), {})[name] = dict(
            median_ms={k: med([r["ms_per_chunk"][k] for r in rs]) for k in keys},
            best_total_ms=min(r["ms_per_chunk"]["total"] for r in rs),
            main_cpu_median_ms={k: med([r["main_cpu_ms_per_chunk"][k] for r in rs]) for k in keys},
            best_main_cpu_ms=min(r["main_cpu_ms_per_chunk"]["total"] for r in rs),
            rounds_total_ms=[r["ms_per_chunk"]["total"] for r in rs],
            cpu_median_ms={k: med([r["cpu_ms_per_chunk"].get(k, 0.0) for r in rs]) for k in cpu_keys},
            ms_per_call={k: med([r["ms_per_call"][k] for r in rs if k in r["ms_per_call"]])
                         for k in ("denoise", "recache", "encode") if any(k in r["ms_per_call"] for r in rs)},
            cpu_ms_per_call={k: med([r["cpu_ms_per_call"][k] for r in rs if k in r["cpu_ms_per_call"]])
                             for k in ("denoise", "recache", "encode") if any(k in r["cpu_ms_per_call"] for r in rs)},
            encodes_per_chunk=cnt["encode"] / chunks,
            refreshes_per_chunk=cnt["refreshes"] / chunks,
            lru_lookups=cnt["lookups"], lru_hits=cnt["lru_hits"],
            lru_hit_rate=cnt["lru_hits"] / cnt["lookups"] if cnt["lookups"] else None,
            re_encodes_per_chunk=cnt["re_encodes"] / chunks,
            commits_per_chunk=sum(r["writer"]["commits"] for r in rs) / chunks,
            context_frames=rs[0]["context_frames"],
        )  # fmt: skip
    return out


def pct(x: float, total: float) -> str:
    return f"{100 * x / total:.1f}%" if total else "-"


def f1(x: float) -> str:
    return f"{x:.1f}"


STORE = ("writer", "maintainer", "lancedb", "ended_threads", "prefetch")  # the memory system's threads
COMPONENTS = ("denoise", "recache", "search_wait", "encode", "refresh_rest", "publish", "other", "total")


def report(summary: dict) -> dict:
    """Print the tables; returns the derived figures (also written to the JSON)."""
    derived = {}
    for b, by in summary.items():
        w, r, wm = by["window"], by["retrieval"], by["window+M"]
        for unit, key, best in (("wall time", "median_ms", "best_total_ms"),
                                ("main-thread CPU", "main_cpu_median_ms", "best_main_cpu_ms")):  # fmt: skip
            table(
                f"{b} stream(s): {unit} per chunk (ms), median over rounds",
                ["component", "window", "retrieval", "window+M", "retr. % of chunk", "retr. - window"],
                [[k, f1(w[key][k]), f1(r[key][k]), f1(wm[key][k]), pct(r[key][k], r[key]["total"]),
                  f1(r[key][k] - w[key][k])] for k in COMPONENTS]
                + [["total (best round)", f1(w[best]), f1(r[best]), f1(wm[best]), "", f1(r[best] - w[best])]],
            )  # fmt: skip
        cpu_keys = sorted(set(w["cpu_median_ms"]) | set(r["cpu_median_ms"]) | set(wm["cpu_median_ms"]))
        table(
            f"{b} stream(s): CPU time per chunk by thread (ms), median over rounds",
            ["threads", "window", "retrieval", "window+M", "retr. % of process CPU"],
            [[k, f1(w["cpu_median_ms"].get(k, 0)), f1(r["cpu_median_ms"].get(k, 0)), f1(wm["cpu_median_ms"].get(k, 0)),
              pct(r["cpu_median_ms"].get(k, 0), sum(r["cpu_median_ms"].values()))] for k in cpu_keys],
        )  # fmt: skip
        d = {}
        rows = []
        for unit, key in (("wall", "median_ms"), ("cpu", "main_cpu_median_ms")):
            m, mw, mm = r[key], w[key], wm[key]
            extra, attn = m["total"] - mw["total"], mm["total"] - mw["total"]
            parts = [
                ("search wait", m["search_wait"]),
                ("encode retrieved chunks", m["encode"]),
                ("refresh rest (import/assign)", m["refresh_rest"]),
                ("attention over memory slots (window+M - window)", attn),
                ("publish difference", m["publish"] - mw["publish"]),
            ]
            parts.append(("remainder", extra - sum(v for _, v in parts)))
            rows.append((unit, m["total"], extra, parts))
            d[f"extra_{unit}_ms"], d[f"memory_attention_{unit}_ms"] = extra, attn
        wall_rows, cpu_rows = rows
        table(
            f"{b} stream(s): where retrieval's extra time goes (retrieval - window, medians; "
            f"wall {f1(wall_rows[2])} ms, main-thread CPU {f1(cpu_rows[2])} ms per chunk)",
            ["part", "wall ms", "% of retr. chunk", "% of extra", "CPU ms", "% of retr. CPU", "% of extra CPU"],
            [[pw, f1(vw), pct(vw, wall_rows[1]), pct(vw, wall_rows[2]), f1(vc), pct(vc, cpu_rows[1]),
              pct(vc, cpu_rows[2])] for (pw, vw), (_, vc) in zip(wall_rows[3], cpu_rows[3])],
        )  # fmt: skip
        calls, cpu_calls = r["ms_per_call"], r["cpu_ms_per_call"]
        table(
            f"{b} stream(s): retrieval counters",
            ["counter", "value"],
            [["encodes per chunk", f"{r['encodes_per_chunk']:.2f}"],
             ["memory-set changes per chunk", f"{r['refreshes_per_chunk']:.2f}"],
             ["LRU lookups / hits", f"{r['lru_lookups']} / {r['lru_hits']}"],
             ["LRU hit rate", "-" if r["lru_hit_rate"] is None else f"{100 * r['lru_hit_rate']:.1f}%"],
             ["re-encodes per chunk (encoded before, dropped by the LRU)", f"{r['re_encodes_per_chunk']:.2f}"],
             ["writer commits per chunk (window / retrieval)",
              f"{w['commits_per_chunk']:.2f} / {r['commits_per_chunk']:.2f}"],
             *[[f"ms per {k} forward call (wall / CPU)", f"{f1(v)} / {f1(cpu_calls.get(k, 0))}"]
               for k, v in calls.items()]],
        )  # fmt: skip
        m, c = r["median_ms"], r["main_cpu_median_ms"]
        bg = sum(r["cpu_median_ms"].get(k, 0.0) for k in STORE)
        caller = m["search_wait"] + m["encode"] + m["refresh_rest"] + m["publish"]
        caller_cpu = c["search_wait"] + c["encode"] + c["refresh_rest"] + c["publish"]
        process_cpu_ms = c["total"] + sum(r["cpu_median_ms"].get(k, 0.0) for k in r["cpu_median_ms"] if k != "main")
        rt, wt, wmt = m["total"], w["median_ms"]["total"], wm["median_ms"]["total"]
        d.update(
            retrieval_over_window=rt / wt, retrieval_over_window_same_context=rt / wmt,
            window_same_context_over_window=wmt / wt,
            retrieval_over_window_cpu=c["total"] / w["main_cpu_median_ms"]["total"],
            retrieval_over_window_same_context_cpu=c["total"] / wm["main_cpu_median_ms"]["total"],
            overhead_caller_ms=caller, overhead_caller_pct=100 * caller / rt,
            overhead_with_background_ms=caller + bg, overhead_with_background_pct=100 * (caller + bg) / rt,
            overhead_cpu_ms=caller_cpu + bg, overhead_cpu_pct=100 * (caller_cpu + bg) / process_cpu_ms,
            background_cpu_ms=bg, background_cpu_window_ms=sum(w["cpu_median_ms"].get(k, 0.0) for k in STORE),
        )  # fmt: skip
        derived[b] = d
        print(
            f"\n{b} stream(s): retrieval / window = {d['retrieval_over_window']:.2f}x wall, "
            f"{d['retrieval_over_window_cpu']:.2f}x CPU; retrieval / window+M = "
            f"{d['retrieval_over_window_same_context']:.2f}x wall, {d['retrieval_over_window_same_context_cpu']:.2f}x "
            f"CPU; window+M / window = {d['window_same_context_over_window']:.2f}x wall"
        )
        print(
            f"{b} stream(s): memory-system overhead (search + encode + write) = "
            f"{d['overhead_caller_pct']:.1f}% of chunk time ({f1(caller)} of {f1(rt)} ms wall in the step: "
            f"search {f1(m['search_wait'])} + encode {f1(m['encode'])} + refresh rest {f1(m['refresh_rest'])} "
            f"+ publish {f1(m['publish'])}); {d['overhead_with_background_pct']:.1f}% with the store threads' CPU "
            f"({f1(bg)} ms/chunk); {d['overhead_cpu_pct']:.1f}% of all process CPU "
            f"[goal: <= 3% on a GPU worker; these are CPU figures]"
        )
        sys.stdout.flush()
    return derived


def git_state() -> dict:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.split()[1::2]  # fmt: skip
    except OSError:
        return {}
    return dict(commit=head, modified=dirty)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=24, help="timed steps per run (every stream makes one chunk)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps per run before the timed ones")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs every configuration once")
    ap.add_argument("--streams", default="1,4", help="comma-separated stream counts")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, as WorkerSettings; 0: torch's)"
    )
    ap.add_argument(
        "--flush-interval", type=float, default=None, help="writer flush_interval_s (default: the store preset's)"
    )
    ap.add_argument("--dir", default=None, help="parent of the temporary databases (default: system temp)")
    ap.add_argument("--json", default=None, help="also write raw runs and the summary to this file")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    if args.threads:
        torch.set_num_threads(args.threads)
    streams = [int(s) for s in args.streams.split(",") if s.strip()]
    if args.chunks < 1 or args.rounds < 1 or args.warmup < 0 or not streams or min(streams) < 1:
        ap.error("--chunks and --rounds must be >= 1, --warmup >= 0, --streams positive integers")
    combos = [(b, name) for b in streams for name in CONFIG_NAMES]
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"retrieval cost: tiny preset, streams {streams}, {args.rounds} rounds x {len(combos)} runs, "
        f"{args.warmup} warmup + {args.chunks} timed steps per run; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {load0}"
    )
    runs = []
    root = Path(tempfile.mkdtemp(prefix="retrieval-cost-", dir=args.dir))
    t_start = time.perf_counter()
    try:
        idx = 0
        for rnd in range(args.rounds):
            order = combos[rnd % len(combos) :] + combos[: rnd % len(combos)]
            for b, name in order:
                r = run_once(name, b, args, root, idx)
                r["round"] = rnd
                idx += 1
                runs.append(r)
                print(
                    f"  round {rnd} {name:<9} x{b}: {r['ms_per_chunk']['total']:7.1f} ms/chunk "
                    f"(encode {r['ms_per_chunk']['encode']:.1f}, search {r['ms_per_chunk']['search_wait']:.1f}, "
                    f"publish {r['ms_per_chunk']['publish']:.1f})",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    digests = {r["weights"] for r in runs}
    if len(digests) != 1:
        raise SystemExit(f"configurations ran different weights: {digests}")
    summary = summarize(runs)
    derived = report(summary)
    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nweights {digests.pop()} in every run; {elapsed:.0f} s; load average at the end {load1}")
    if args.json:
        doc = dict(
            date=datetime.now(UTC).isoformat(timespec="seconds"), machine=platform.platform(),
            processor=platform.processor(), cpus=os.cpu_count(), torch=torch.__version__,
            torch_threads=torch.get_num_threads(), load_average_start=load0, load_average_end=load1,
            args=vars(args), elapsed_s=elapsed, git=git_state(), summary=summary, derived=derived, runs=runs,
            command="python bench/retrieval_cost.py " + " ".join(sys.argv[1:]),
        )  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
