"""Day-scale soak: does a stream run for a day at constant memory, speed and disk per frame?

Two subcommands, both resumable (rerun the same command with the same --out after a crash or a kill):

    python bench/soak.py model --memory {window,retrieval,sparse} --frames N --out DIR
        [--streams 1] [--sample-every 1000] [--height 32 --width 32] [--stream world|plain]
        [--checkpoint-every 64] [--segment-chunks 64] [--threads 1]
    python bench/soak.py store --frames 1300000 --out DIR [--payload auto|wan|tiny] [--streams 1]
        [--sample-every 1000] [--p99-budget-ms 50] [--revisit 0.3]
    python bench/soak.py report DIR

``model`` drives the real worker body in-process (``workers.worker.GeneratorWorkerImpl``, no Ray) on the
tiny preset: world-model streams (shipped weights, camera trajectory ``revisit``, world = seed) unless
``--stream plain``; segments, manifests and checkpoints under DIR/streams, the LanceDB memory store in
DIR/memory, exactly as ``longroll run`` lays them out. It steps until every stream has N frames (tiny: a
latent frame is a video frame, 3 per chunk). A restart reloads each stream from its newest checkpoint
(the worker's own ``assign``), so it loses at most --checkpoint-every chunks.

``store`` is the memory system alone, accelerated (no model): per chunk it publishes like the worker
(``MemoryLink.publish``: hot tier + batched writer), retrieves for the next chunk (k=2 among chunks older
than a 2-chunk window minus the newest evicted one, as the generator's ``_search_kwargs``) and every 64
chunks pins a checkpoint version and releases all but the newest 2. Payloads are seeded random float16
latents of Wan2.1-1.3B shape (3 latent frames of 16 x 60 x 104 = 480x832 px, a latent frame is 4 video
frames: 600 kB a chunk) or of the tiny preset (--payload tiny, 18 kB); embeddings are seeded random unit
vectors, and a share (--revisit) of the queries lies near one old chunk, so retrieval reaches far back
into history (the sample's hit_rate says how often that chunk came back first). ``--frames`` counts
video frames: 1.3 M frames are 108 k Wan chunks, 65 GB of payload. The run is refused when the free disk
is below what it writes plus a margin; ``auto`` (the default) picks wan when that fits, else tiny. A
restart resumes each stream at the store's ``durable_chunk_index + 1``.

Every --sample-every frames (per stream) one sample is appended to DIR/soak.jsonl (flushed + fsync'd):
frames, wall time, process RSS (MiB), CUDA allocated/reserved when there is a GPU, bytes on disk of
DIR/memory (with its LanceDB parts: data, _versions, _transactions, _indices, ...) and of the rest of
DIR, frames/s and chunks/s (all streams) over the interval, retrieval latency p50/p99 over the interval
(model: the generator's ``retrieval_ms``, the time a step waited for its retrieval; store: the search
itself), open files, threads, the writer's counters, and per-structure byte counts where the generator or
the retriever has ``memory_bytes()``. The first sample of a resumed session is marked ``restart``; the
last one (``final``) is taken after a closing flush and maintenance pass. Progress: one line on stderr
per sample; logs at level warning. SIGTERM/SIGINT stop cleanly after the current chunk (model: with a
checkpoint of every stream there).

At the end, and with ``report DIR`` at any time, DIR/soak.json (config, machine, sessions, samples,
summary) and DIR/soak.png (RSS, disk per frame, frames/s, retrieval p50/p99 against frames) are written
and a table printed (definitions in bench/soak_plot.py): per curve the value at 10k frames and at the
end and the least-squares slope per 100,000 frames past a warm-up of min(10k frames, 5% of the run);
then the targets: RSS growth 10k -> end <= 2%, frames/s at the end within 5% of that at 10k, store disk
per latent frame after maintenance <= 1.2x the payload (float16 latents + a third of the 64-float
embedding), and for ``store`` RSS flat within 2% over the last 80% of the run and retrieval p99 at the
end within --p99-budget-ms. Bad input: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.soak_plot import read_records, write_report  # noqa: E402

SOAK_LOG = "soak.jsonl"
OWN_FILES = ("soak.jsonl", "soak.json", "soak.json.tmp", "soak.png")
EMBEDDING_DIM = 64
FRAMES_PER_CHUNK = 3
WAN_LATENT = (16, 60, 104)  # 480 x 832 px through the Wan VAE's 8x spatial stride
WAN_TEMPORAL = 4  # video frames per latent frame
TINY_LATENT = (3, 32, 32)
STORE_WINDOW_CHUNKS, STORE_EXCLUDE_RECENT, STORE_K = 2, 1, 2
STORE_CHECKPOINT_EVERY, STORE_KEEP_CHECKPOINTS = 64, 2
DISK_MARGIN = 1.25  # free disk must exceed this times the estimate, plus DISK_SLACK
DISK_SLACK = 2 * 2**30
STORE_OVERHEAD = 1.2  # estimate of store bytes per payload byte (the disk target)
MAX_FRAMES, MAX_STREAMS, MAX_SIDE = 10**9, 64, 512


class UsageError(ValueError):
    """Bad input: one ``error:`` line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


# ---- one sample ---------------------------------------------------------------------------------
@dataclass
class Sample:
    session: int
    frames: int  # per stream (the slowest one); model: latent = video frames; store: video frames
    chunks: int  # per stream (the slowest one)
    wall_s: float  # seconds of running so far, summed over sessions
    time: float  # unix time
    rss_mib: float
    memory_disk_bytes: int  # DIR/memory: the LanceDB store
    other_disk_bytes: int  # the rest of DIR: segments, manifests, checkpoints
    frames_per_s: float | None  # all streams, over the interval since the previous sample
    chunks_per_s: float | None
    retrieval_p50_ms: float | None  # over the interval
    retrieval_p99_ms: float | None
    retrieval_n: int = 0
    restart: bool = False  # first sample of a session that resumed an earlier one
    final: bool = False  # after the closing flush + maintenance pass (no rates)
    cpu_s: float = 0.0  # CPU seconds of this process (user + system) so far in this session
    frames_per_cpu_s: float | None = None  # all streams, over the interval, per CPU-second of this process
    rss_anon_mib: float | None = None  # of rss_mib: anonymous memory (Linux)
    rss_file_mib: float | None = None  # of rss_mib: pages of mapped files, e.g. libraries' code
    cuda_allocated_mib: float | None = None
    cuda_reserved_mib: float | None = None
    num_fds: int | None = None
    threads: int = 0
    memory_disk_parts: dict[str, list[int]] = field(default_factory=dict)  # LanceDB part -> [bytes, files]
    structures: dict[str, int] | None = None  # memory_bytes() of the generator / retriever, where present
    counters: dict[str, float] = field(default_factory=dict)
    heap: dict[str, float] = field(default_factory=dict)  # MiB: malloc in use / free, Arrow pool, LanceDB caches
    hit_rate: float | None = None  # store: share of revisit queries whose chunk came back first
    type: str = "sample"


class SoakLog:
    """DIR/soak.jsonl: one JSON record a line, each flushed and fsync'd; a torn last line is cut off."""

    def __init__(self, out: Path):
        self.path = out / SOAK_LOG
        out.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self._f = open(self.path, "a")  # noqa: SIM115 - open for the whole session, closed by close()

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-write: drop the partial line
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ---- measurements -------------------------------------------------------------------------------
def disk_usage(out: Path) -> tuple[int, int, dict[str, list[int]]]:
    """(bytes of out/memory, bytes of the rest of out, out/memory's LanceDB parts -> [bytes, files])."""
    memory, other, parts = 0, 0, {}
    for dirpath, _, filenames in os.walk(out):
        rel = Path(dirpath).relative_to(out).parts
        in_memory = rel[:1] == ("memory",)
        part = rel[2] if len(rel) > 2 else "table"  # memory/<table>.lance/<part>/...
        for name in filenames:
            if not rel and name in OWN_FILES:
                continue
            try:
                size = os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # removed by a concurrent cleanup
                continue
            if in_memory:
                memory += size
                acc = parts.setdefault(part, [0, 0])
                acc[0] += size
                acc[1] += 1
            else:
                other += size
    return memory, other, parts


def process_stats() -> dict:
    proc = psutil.Process()
    stats = {"rss_mib": proc.memory_info().rss / 2**20, "threads": threading.active_count()}
    cpu = proc.cpu_times()
    stats["cpu_s"] = cpu.user + cpu.system
    try:
        stats["num_fds"] = proc.num_fds()
    except (AttributeError, psutil.Error):  # not on every OS
        stats["num_fds"] = None
    stats["heap"] = heap_stats()
    stats.update(rss_parts())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        stats["cuda_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
        stats["cuda_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
    return stats


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def rss_parts() -> dict:
    """Anonymous (heap, stacks, tensors) and file-backed (mapped libraries' pages: clean, shared, and
    bounded by the libraries' size) parts of RSS, in MiB, from /proc (Linux); empty elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, kib = line.split()[:2]
                    out["rss_anon_mib" if key == "RssAnon:" else "rss_file_mib"] = int(kib) / 1024
    except OSError:
        pass
    return out


def heap_stats() -> dict:
    """Where RSS sits, in MiB: glibc's heap (in use / free but kept, mmapped blocks), Arrow's memory
    pool and LanceDB's session caches; a probe that is not there is left out."""
    out: dict[str, float] = {}
    try:
        info = ctypes.CDLL("libc.so.6").mallinfo2
        info.restype = _Mallinfo2
        m = info()
        out |= {"malloc_in_use_mib": m.uordblks / 2**20, "malloc_free_mib": m.fordblks / 2**20,
                "malloc_mmap_mib": m.hblkhd / 2**20}  # fmt: skip
    except (OSError, AttributeError):  # not glibc
        pass
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        out["arrow_pool_mib"] = pa.total_allocated_bytes() / 2**20
    db = sys.modules.get("memory_store.db")
    if db is not None:
        out["lance_session_mib"] = sum(s.size_bytes for s in list(db._SESSIONS.values())) / 2**20
    return out


def structure_bytes(**objs) -> dict[str, int] | None:
    """``name.key -> bytes`` of every object that has ``memory_bytes`` (a method or a dict); None: none has."""
    out: dict[str, int] = {}
    for name, obj in objs.items():
        fn = getattr(obj, "memory_bytes", None)
        if fn is None:
            continue
        try:
            found = fn() if callable(fn) else fn
            out.update({f"{name}.{k}": int(v) for k, v in dict(found).items()})
        except Exception as e:  # noqa: BLE001 - a colleague's probe must never stop the soak
            out[f"{name}.error"] = -1
            print(f"note: {name}.memory_bytes failed: {e!r}", file=sys.stderr)
    return out or None


def writer_counters(link) -> dict[str, float]:
    st = link.writer.stats
    return {"chunks_put": st.chunks_put, "chunks_committed": st.chunks_committed, "commits": st.commits,
            "commit_retries": st.commit_retries}  # fmt: skip


def percentiles(ms: list[float]) -> tuple[float | None, float | None]:
    if not ms:
        return None, None
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


class Sampler:
    """Interval bookkeeping between samples, and the samples' records."""

    def __init__(self, log: SoakLog, out: Path, session: int, every: int, streams: int, resumed: bool,
                 frames_at_start: int, chunks_at_start: int, last_sample: dict | None):  # fmt: skip
        self.log, self.out, self.session, self.every, self.streams = log, out, session, every, streams
        self.restart_pending = resumed
        self.wall_before = last_sample["wall_s"] if last_sample else 0.0
        sampled = last_sample["frames"] if last_sample else 0
        self.next_at = (max(frames_at_start, sampled) // every + 1) * every
        self.t_session = self.t_last = time.perf_counter()
        self.frames_last, self.chunks_last = frames_at_start, chunks_at_start
        self.latencies: list[float] = []
        self.hits: list[bool] = []
        self.cpu_last = process_stats()["cpu_s"]

    def due(self, frames: int) -> bool:
        return frames >= self.next_at

    def take(self, frames: int, chunks: int, *, final: bool = False, **extra) -> Sample:
        now = time.perf_counter()
        dt = now - self.t_last
        mem, other, parts = disk_usage(self.out)
        p50, p99 = percentiles(self.latencies)
        rates = not final and dt > 0 and frames > self.frames_last
        stats = process_stats()
        cpu_dt = stats["cpu_s"] - self.cpu_last
        if rates and cpu_dt > 0:
            stats["frames_per_cpu_s"] = (frames - self.frames_last) * self.streams / cpu_dt
        s = Sample(
            session=self.session, frames=frames, chunks=chunks, wall_s=self.wall_before + now - self.t_session,
            time=time.time(), memory_disk_bytes=mem, other_disk_bytes=other, memory_disk_parts=parts,
            frames_per_s=(frames - self.frames_last) * self.streams / dt if rates else None,
            chunks_per_s=(chunks - self.chunks_last) * self.streams / dt if rates else None,
            retrieval_p50_ms=p50, retrieval_p99_ms=p99, retrieval_n=len(self.latencies),
            restart=self.restart_pending, final=final,
            hit_rate=float(np.mean(self.hits)) if self.hits else None, **stats, **extra,
        )  # fmt: skip
        self.log.append(asdict(s))
        self.restart_pending = False
        self.cpu_last = stats["cpu_s"]
        self.t_last, self.frames_last, self.chunks_last = now, frames, chunks
        self.latencies, self.hits = [], []
        self.next_at = (frames // self.every + 1) * self.every
        return s


def progress_line(kind: str, s: Sample, target: int, streams: int) -> None:
    rate = s.frames_per_s or 0.0
    left = max(0, target - s.frames) * streams
    eta = f"{left / rate / 3600:.2f} h" if rate > 0 else "-"
    p99 = "-" if s.retrieval_p99_ms is None else f"{s.retrieval_p99_ms:.2f} ms"
    print(f"soak {kind}: {s.frames:,}/{target:,} frames  rss {s.rss_mib:.1f} MiB"
          f"  store {s.memory_disk_bytes / 1e6:.1f} MB  rest {s.other_disk_bytes / 1e6:.1f} MB"
          f"  {rate:.2f} frames/s  p99 {p99}"
          f"{'  (restart)' if s.restart else ''}{'  (final)' if s.final else ''}  eta {eta}",
          file=sys.stderr, flush=True)  # fmt: skip


# ---- machine, config, sessions ------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": getattr(torch, "__version__", None),
            "platform": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    try:
        import lancedb

        info["lancedb"] = lancedb.__version__
    except (ImportError, AttributeError):
        pass
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


IDENTITY = ("kind", "memory", "payload", "streams", "latent_shape", "stream", "weights", "checkpoint_every",
            "segment_chunks")  # fmt: skip


def previous_run(out: Path, config: dict) -> tuple[list[dict], list[dict]]:
    """The sessions and samples already in ``out``; UsageError when they are of another soak."""
    sessions, samples = read_records(out)
    if sessions:
        old = sessions[0]["config"]
        diff = [k for k in IDENTITY if old.get(k) != config.get(k)]
        if diff:
            got = ", ".join(f"{k}={old.get(k)!r} (now {config.get(k)!r})" for k in diff)
            raise UsageError(f"{out} holds another soak run: {got}; use a fresh --out")
    elif out.exists() and any(p.name not in OWN_FILES for p in out.iterdir()):
        raise UsageError(f"{out} exists, is not empty and holds no soak run; use a fresh --out")
    return sessions, samples


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out} is not writable ({probe})")


def check_disk(out: Path, need_bytes: float, what: str) -> None:
    """Warn about the disk a run needs; UsageError when the free disk is below it with margin."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    required = need_bytes * DISK_MARGIN + DISK_SLACK
    print(f"warning: this run writes about {need_bytes / 1e9:.1f} GB ({what}) to {out}; "
          f"{free / 1e9:.1f} GB free", file=sys.stderr, flush=True)  # fmt: skip
    if free < required:
        raise UsageError(
            f"{free / 1e9:.1f} GB free where {out} lives, the run needs {required / 1e9:.1f} GB "
            f"({need_bytes / 1e9:.1f} GB x {DISK_MARGIN} + {DISK_SLACK / 2**30:.0f} GiB): fewer --frames, "
            f"--payload tiny or another --out"
        )


class StopFlag:
    """SIGTERM / SIGINT: finish the current chunk, then stop cleanly (resumable)."""

    def __init__(self) -> None:
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.set = True


def open_session(out: Path, config: dict, start_frames: int, **extra) -> tuple[SoakLog, int, dict | None]:
    """Append this session's record; returns (log, session number, last sample of earlier sessions)."""
    sessions, samples = read_records(out)
    log = SoakLog(out)
    session = len(sessions)
    log.append({"type": "session", "session": session, "time": time.time(), "config": config,
                "machine": machine_info(), "start_frames": start_frames, "argv": sys.argv[1:], **extra})  # fmt: skip
    running = [s for s in samples if not s.get("final")]
    return log, session, (running[-1] if running else None)


def complete(out: Path, frames: int) -> bool:
    """The run in ``out`` already reached ``frames`` and took its final sample: only report it."""
    _, samples = read_records(out)
    if any(s.get("final") and s["frames"] >= frames for s in samples):
        print(f"{out} already holds a finished soak of {frames:,} frames; reporting it", file=sys.stderr)
        write_report(out)
        return True
    return False


def finish(out: Path, log: SoakLog, stopped: bool) -> int:
    log.close()
    write_report(out)
    if stopped:
        print(f"stopped; rerun the same command to continue from {out}", file=sys.stderr)
    return 0


# ---- model --------------------------------------------------------------------------------------
def model_config(args) -> dict:
    from workers.config import ModelConfig
    from workers.weights import default_weights

    try:
        cfg = ModelConfig.from_name("tiny", memory=args.memory, latent_height=args.height, latent_width=args.width)
    except ValueError as e:
        raise UsageError(str(e)) from None
    weights = default_weights(cfg)
    return {
        "kind": "model", "memory": args.memory, "streams": args.streams, "frames": args.frames,
        "sample_every": args.sample_every, "stream": args.stream, "weights": weights,
        "trajectory": "revisit" if args.stream == "world" else "",
        "latent_shape": [cfg.latent_channels, cfg.latent_height, cfg.latent_width],
        "embedding_dim": cfg.embedding_dim, "frames_per_chunk": cfg.frames_per_chunk,
        "video_frames_per_latent": cfg.vae_stride[0], "checkpoint_every": args.checkpoint_every,
        "segment_chunks": args.segment_chunks or args.checkpoint_every, "threads": args.threads,
        "model": cfg.to_dict(),
    }  # fmt: skip


def model_specs(config: dict) -> list:
    from workers.types import StreamSpec

    if config["stream"] == "world":
        return [StreamSpec(f"s{i}", seed=i, trajectory="revisit", world=i) for i in range(config["streams"])]
    return [StreamSpec(f"s{i}", seed=i) for i in range(config["streams"])]


def build_worker(out: Path, config: dict):
    from workers.messages import WorkerSettings
    from workers.worker import GeneratorWorkerImpl

    settings = WorkerSettings(
        out_dir=str(out.resolve()), model=config["model"], checkpoint_every=config["checkpoint_every"],
        segment_chunks=config["segment_chunks"], memory_uri=str((out / "memory").resolve()),
        threads=config["threads"], weights=config["weights"], log_format="json", log_level="warning",
    )  # fmt: skip
    return GeneratorWorkerImpl("soak", settings)


def run_model(args) -> int:
    out = Path(args.out)
    check_out_dir(out)
    config = model_config(args)
    previous_run(out, config)
    if complete(out, args.frames):
        return 0
    c, h, w = config["latent_shape"]
    per_frame = c * h * w * 2 + EMBEDDING_DIM * 4 / FRAMES_PER_CHUNK
    left = max(0, args.frames - (last_frames(out) or 0))
    check_disk(out, left * args.streams * per_frame * STORE_OVERHEAD, "memory store only; segments extra")
    from workers.messages import StreamAssignment

    worker = build_worker(out, config)
    target_chunks = math.ceil(args.frames / FRAMES_PER_CHUNK)
    assigned = [worker.assign(StreamAssignment(spec, target_chunks)) for spec in model_specs(config)]
    chunks = {a.stream_id: a.start_chunk for a in assigned}
    fpc = FRAMES_PER_CHUNK * config["video_frames_per_latent"]
    start = min(chunks.values())
    log, session, last = open_session(
        out, config, start * fpc, checkpoints={a.stream_id: a.checkpoint for a in assigned},
        lost_frames=max(0, (last_frames(out) or 0) - start * fpc),
    )  # fmt: skip
    sampler = Sampler(log, out, session, args.sample_every, args.streams, session > 0, start * fpc, start, last)
    stop = StopFlag()
    try:
        while worker.streams and not stop.set:
            report = worker.step()
            for p in report.streams:
                chunks[p.stream_id] = p.next_chunk
                if p.retrieval_ms is not None:
                    sampler.latencies.append(p.retrieval_ms)
            done = min(chunks.values())
            if sampler.due(done * fpc) or not worker.streams:
                progress_line("model", model_sample(sampler, worker, done, fpc), args.frames, args.streams)
        if stop.set:  # checkpoint where the streams stand (as a stop does), so the next session loses nothing
            worker.release(list(worker.streams))
        else:
            close_model(worker, sampler, min(chunks.values()), fpc, args)
    finally:
        worker.shutdown()
    return finish(out, log, stop.set)


def last_frames(out: Path) -> int | None:
    _, samples = read_records(out)
    running = [s for s in samples if not s.get("final")]
    return running[-1]["frames"] if running else None


def model_sample(sampler: Sampler, worker, chunks: int, fpc: int, final: bool = False) -> Sample:
    link = worker.memory
    retriever = link.retriever if link is not None else None
    counters = writer_counters(link) if link is not None else {}
    if link is not None:
        counters["hot_tier_rows"] = sum(link.rows(f"s{i}") for i in range(sampler.streams))
    structures = structure_bytes(generator=worker.gen, retriever=retriever)
    return sampler.take(chunks * fpc, chunks, final=final, structures=structures, counters=counters)


def close_model(worker, sampler: Sampler, chunks: int, fpc: int, args) -> None:
    """The closing flush and maintenance pass, then the final sample (disk per frame after maintenance)."""
    if worker.memory is not None:
        for i in range(args.streams):
            worker.memory.writer.maintain(f"s{i}")
    progress_line("model", model_sample(sampler, worker, chunks, fpc, final=True), args.frames, args.streams)


# ---- store --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    name: str
    latent: tuple[int, int, int]
    video_per_latent: int

    @property
    def chunk_bytes(self) -> int:
        c, h, w = self.latent
        return FRAMES_PER_CHUNK * c * h * w * 2 + EMBEDDING_DIM * 4

    @property
    def frames_per_chunk(self) -> int:
        """Video frames per chunk."""
        return FRAMES_PER_CHUNK * self.video_per_latent


PAYLOADS = {"wan": Payload("wan", WAN_LATENT, WAN_TEMPORAL), "tiny": Payload("tiny", TINY_LATENT, 1)}


def store_need_bytes(p: Payload, frames: int, streams: int) -> float:
    return math.ceil(frames / p.frames_per_chunk) * streams * p.chunk_bytes * STORE_OVERHEAD


def choose_payload(args, out: Path, sessions: list[dict]) -> Payload:
    """The payload of a resumed run, the one asked for, or (auto) wan when the disk holds it, else tiny."""
    if sessions and sessions[0]["config"].get("kind") != "store":
        raise UsageError(f"{out} holds a soak run of kind {sessions[0]['config'].get('kind')!r}; use a fresh --out")
    if sessions:
        old = sessions[0]["config"]["payload"]
        if args.payload not in ("auto", old):
            raise UsageError(f"{out} holds a soak run with --payload {old}; use a fresh --out")
        return PAYLOADS[old]
    if args.payload != "auto":
        return PAYLOADS[args.payload]
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    wan = PAYLOADS["wan"]
    if free >= store_need_bytes(wan, args.frames, args.streams) * DISK_MARGIN + DISK_SLACK:
        return wan
    print(f"note: --payload auto: wan payloads need {store_need_bytes(wan, args.frames, args.streams) / 1e9:.0f} GB, "
          f"{free / 1e9:.0f} GB free: using tiny", file=sys.stderr)  # fmt: skip
    return PAYLOADS["tiny"]


def store_config(args, p: Payload) -> dict:
    return {
        "kind": "store", "payload": p.name, "streams": args.streams, "frames": args.frames,
        "sample_every": args.sample_every, "latent_shape": list(p.latent), "embedding_dim": EMBEDDING_DIM,
        "frames_per_chunk": FRAMES_PER_CHUNK, "video_frames_per_latent": p.video_per_latent,
        "p99_budget_ms": args.p99_budget_ms, "revisit": args.revisit, "seed": args.seed, "k": STORE_K,
        "window_chunks": STORE_WINDOW_CHUNKS, "exclude_recent": STORE_EXCLUDE_RECENT,
        "checkpoint_every": STORE_CHECKPOINT_EVERY, "keep_checkpoints": STORE_KEEP_CHECKPOINTS,
        "store_preset": "wan-1.3b" if p.name == "wan" else "tiny",
    }  # fmt: skip


class SyntheticStream:
    """Seeded chunks of one stream: random float16-exact latents and unit embeddings, and its queries."""

    def __init__(self, seed: int, index: int, p: Payload, revisit: float):
        self.seed, self.index, self.p, self.revisit = seed, index, p, revisit
        self.stream_id = f"s{index}"

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index, *keys])

    def embedding(self, chunk: int) -> np.ndarray:
        e = self._rng(0, chunk).standard_normal(EMBEDDING_DIM).astype(np.float32)
        return e / np.linalg.norm(e)

    def chunk(self, i: int):
        import torch

        from workers.types import Chunk

        g = torch.Generator().manual_seed(int(self._rng(1, i).integers(2**62)))
        lat = torch.randn((FRAMES_PER_CHUNK, *self.p.latent), generator=g)
        return Chunk(self.stream_id, i, i * FRAMES_PER_CHUNK, lat, torch.empty(0, dtype=torch.uint8),
                     self.embedding(i))  # fmt: skip

    def query(self, i: int, stop: int) -> tuple[np.ndarray, int | None]:
        """Query for chunk i, and the old chunk it aims at (None: near the newest chunk, no target).

        ``stop``: candidates are chunks below it (window and the newest evicted chunk left out)."""
        rng = self._rng(2, i)
        noise = rng.standard_normal(EMBEDDING_DIM).astype(np.float32) * 0.05
        target = int(rng.integers(stop)) if stop > 0 and rng.random() < self.revisit else None
        base = self.embedding(target if target is not None else max(i - 1, 0))
        q = base + noise
        return q / np.linalg.norm(q), target


def store_search(link, stream: SyntheticStream, i: int) -> tuple[float, bool | None]:
    """The retrieval for chunk i (as the generator's): (ms, whether a revisit query found its chunk first)."""
    before = i - STORE_WINDOW_CHUNKS
    q, target = stream.query(i, before - STORE_EXCLUDE_RECENT)
    t0 = time.perf_counter()
    hits = link.retriever.search(stream.stream_id, q, STORE_K, before_chunk=before,
                                 exclude_recent=STORE_EXCLUDE_RECENT)  # fmt: skip
    ms = (time.perf_counter() - t0) * 1e3
    return ms, (bool(hits) and hits[0].chunk_index == target) if target is not None else None


class Checkpoints:
    """Checkpoint pins of one stream, as the worker's ``_checkpoint`` makes them: pin, then release old."""

    def __init__(self, link, stream_id: str):
        from workers.memory import CHECKPOINT_TAG

        self.link, self.stream_id = link, stream_id
        self.kept = [int(t[len(CHECKPOINT_TAG) :]) for t in link.checkpoint_tags(stream_id)][-STORE_KEEP_CHECKPOINTS:]

    def maybe_pin(self, next_chunk: int) -> None:
        if next_chunk % STORE_CHECKPOINT_EVERY:
            return
        self.link.pin_checkpoint(self.stream_id, next_chunk)
        self.kept = [*self.kept, next_chunk][-STORE_KEEP_CHECKPOINTS:]
        self.link.release_checkpoints(self.stream_id, self.kept)


def open_link(out: Path, config: dict):
    from workers.config import ModelConfig
    from workers.memory import MemoryLink

    cfg = ModelConfig.from_name(config["store_preset"])
    return MemoryLink(str((out / "memory").resolve()), cfg)


def store_resume_points(link, streams: list[SyntheticStream]) -> dict[str, int]:
    """Next chunk of each stream: one past its durable prefix (the hot tier is warmed from the store)."""
    out = {}
    for s in streams:
        out[s.stream_id] = link.writer.durable_chunk_index(s.stream_id) + 1
        link.open_stream(s.stream_id)
    return out


def store_chunks(streams: list[SyntheticStream], nxt: dict[str, int], target: int) -> Iterator[SyntheticStream]:
    """Round-robin over streams below the target: one chunk each per round."""
    while True:
        left = [s for s in streams if nxt[s.stream_id] < target]
        if not left:
            return
        yield from left


def run_store(args) -> int:
    out = Path(args.out)
    check_out_dir(out)
    sessions, _ = read_records(out)
    p = choose_payload(args, out, sessions)
    config = store_config(args, p)
    previous_run(out, config)
    if complete(out, args.frames):
        return 0
    from workers.logs import configure_logging

    left = max(0, args.frames - (last_frames(out) or 0))  # before anything is written
    check_disk(out, store_need_bytes(p, left, args.streams), f"{p.name} payloads, {p.chunk_bytes / 1e3:.0f} kB a chunk")
    configure_logging("json", "warning")
    link = open_link(out, config)
    streams = [SyntheticStream(args.seed, i, p, args.revisit) for i in range(args.streams)]
    nxt = store_resume_points(link, streams)
    target = math.ceil(args.frames / p.frames_per_chunk)
    start = min(nxt.values())
    at = start * p.frames_per_chunk
    lost = max(0, (last_frames(out) or 0) - at)
    log, session, last = open_session(out, config, at, next_chunks=nxt, lost_frames=lost)
    sampler = Sampler(log, out, session, args.sample_every, args.streams, session > 0, at, start, last)
    pins = {s.stream_id: Checkpoints(link, s.stream_id) for s in streams}
    stop = StopFlag()
    sample = lambda final=False: store_sample(sampler, link, streams, min(nxt.values()), p, final)  # noqa: E731
    try:
        for s in store_chunks(streams, nxt, target):
            if stop.set:
                break
            i = nxt[s.stream_id]
            ms, hit = store_search(link, s, i)
            sampler.latencies.append(ms)
            if hit is not None:
                sampler.hits.append(hit)
            link.publish(s.chunk(i))
            nxt[s.stream_id] = i + 1
            pins[s.stream_id].maybe_pin(i + 1)
            done = min(nxt.values())
            if sampler.due(done * p.frames_per_chunk) or done >= target:
                progress_line("store", sample(), args.frames, args.streams)
        if not stop.set:
            for s in streams:
                link.writer.maintain(s.stream_id)
            progress_line("store", sample(final=True), args.frames, args.streams)
    finally:
        link.close()
    return finish(out, log, stop.set)


def store_sample(sampler: Sampler, link, streams: list[SyntheticStream], chunks: int, p: Payload,
                 final: bool) -> Sample:  # fmt: skip
    counters = writer_counters(link)
    counters["hot_tier_rows"] = sum(link.rows(s.stream_id) for s in streams)
    structures = structure_bytes(retriever=link.retriever)
    return sampler.take(chunks * p.frames_per_chunk, chunks, final=final, structures=structures, counters=counters)


# ---- command line -------------------------------------------------------------------------------
def positive(name: str, lo: int = 1, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {v}")
        return v

    return parse


def side(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        v = positive(name, 8, MAX_SIDE)(text)
        if v % 4:
            raise argparse.ArgumentTypeError(f"{name} must be a multiple of 4 (the tiny preset's patch), got {v}")
        return v

    return parse


def budget_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--p99-budget-ms must be a number, got {text!r}") from None
    if not 0 < v < 1e6:
        raise argparse.ArgumentTypeError(f"--p99-budget-ms must be in (0, 1e6), got {v:g}")
    return v


def share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--revisit must be a number, got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"--revisit must be in [0, 1], got {v:g}")
    return v


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=positive("--frames", 1, MAX_FRAMES), required=True, help="frames per stream")
    p.add_argument("--out", required=True, help="run directory (rerun with the same one to resume)")
    p.add_argument("--streams", type=positive("--streams", 1, MAX_STREAMS), default=1, help="streams (default 1)")
    p.add_argument("--sample-every", type=positive("--sample-every", 1, MAX_FRAMES), default=1000,
                   help="frames per stream between samples (default 1000)")  # fmt: skip


def build_parser() -> Parser:
    p = Parser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    m = sub.add_parser("model", help="the tiny model through the worker body")
    m.add_argument("--memory", choices=["window", "retrieval", "sparse"], required=True)
    add_common(m)
    m.add_argument("--height", type=side("--height"), default=None, help="frame height in px (default 32)")
    m.add_argument("--width", type=side("--width"), default=None, help="frame width in px (default 32)")
    m.add_argument("--stream", choices=["world", "plain"], default="world",
                   help="world: revisit camera path over a procedural world (default); plain: no camera")  # fmt: skip
    m.add_argument("--checkpoint-every", type=positive("--checkpoint-every", 1, 10**6), default=64,
                   help="checkpoint every K chunks (default 64)")  # fmt: skip
    m.add_argument("--segment-chunks", type=positive("--segment-chunks", 1, 10**6), default=None,
                   help="chunks per segment; must divide --checkpoint-every (default: = K)")  # fmt: skip
    m.add_argument("--threads", type=positive("--threads", 1, os.cpu_count() or 1), default=1,
                   help="torch CPU threads of the worker (default 1, as the worker's)")  # fmt: skip
    s = sub.add_parser("store", help="the memory store alone at Wan payload shapes, no model")
    add_common(s)
    s.add_argument("--payload", choices=["auto", "wan", "tiny"], default="auto",
                   help="latent shape of a chunk (default auto: wan when the disk holds it, else tiny)")  # fmt: skip
    s.add_argument("--p99-budget-ms", type=budget_ms, default=50.0, help="retrieval p99 budget (default 50)")
    s.add_argument("--revisit", type=share, default=0.3, help="share of queries aimed at one old chunk (default 0.3)")
    s.add_argument("--seed", type=positive("--seed", 0, 2**31), default=0, help="seed of payloads and queries")
    r = sub.add_parser("report", help="write soak.json / soak.png of DIR and print the summary")
    r.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "report":
            if write_report(Path(args.dir)) is None:
                raise UsageError(f"{args.dir} holds no soak samples ({SOAK_LOG})")
            return 0
        if args.cmd == "model":
            seg = args.segment_chunks or args.checkpoint_every
            if args.checkpoint_every % seg:
                raise UsageError(f"--segment-chunks {seg} must divide --checkpoint-every {args.checkpoint_every}")
            return run_model(args)
        return run_store(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
