"""Every size an input may set, and the machine facts some of the limits derive from: one place.

A :class:`Range` bounds one number and says why; the ``*_FLAGS`` tables map each subcommand's
argparse ``dest`` to its range (``orchestrator.cli_common.check_flags`` turns a value outside it into
one ``error:`` line, exit 2, before anything is started or written). Limits that depend on the model
(frames, upscaled frame size, the memory of many streams) are checked where the model config is known.
See docs/limits.md for the table.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

INT64_MAX = 2**63 - 1  # seeds and frame counts are int64 in torch and numpy


@dataclass(frozen=True)
class Range:
    lo: int | float  # smallest allowed value (excluded when open_lo)
    hi: int | float  # largest allowed value
    why: str  # why the limit is where it is; quoted in the error
    integer: bool = True  # False: any finite float
    open_lo: bool = False  # the value must be > lo (floats such as seconds or CPUs)

    def problem(self, value) -> str | None:
        """None when ``value`` is allowed, else the rest of an error message (after the flag's name)."""
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return f"must be {'an integer' if self.integer else 'a number'}, got {value!r}"
        if not self.integer and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        low = value <= self.lo if self.open_lo else value < self.lo
        if not low and value <= self.hi:
            return None
        positive = (self.integer and self.lo == 1) or (self.open_lo and self.lo == 0)
        if positive:
            return (
                f"must be > 0, got {_num(value)}"
                if low
                else f"must be <= {_num(self.hi)} ({self.why}), got {_num(value)}"
            )
        return f"must be in {_num(self.lo)}..{_num(self.hi)} ({self.why}), got {_num(value)}"


def _num(v: int | float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


# ---- the machine ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    cpus: int  # logical CPUs as os.cpu_count() reports them (what the embedded Ray is sized by)
    memory_bytes: int  # physical memory, or the cgroup's memory limit when that is lower


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


@functools.cache
def this_machine() -> Machine:
    """The CPUs and memory of this machine (cached; tests replace this function)."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_memory_limit()
    return Machine(cpus=os.cpu_count() or 1, memory_bytes=min(memory, limit) if limit else memory)


OVERSUBSCRIPTION = (
    4  # embedded Ray: CPUs reserved and worker processes up to 4x the CPUs (beyond, torch threads only queue)
)
MEMORY_FRACTION = 0.8  # of the machine's memory one run's streams may fill: the rest is Ray, the models and the OS


def threads_range(machine: Machine) -> Range:
    """torch CPU threads of one process: more than OVERSUBSCRIPTION per CPU only adds contention."""
    return Range(1, machine.cpus * OVERSUBSCRIPTION, f"{OVERSUBSCRIPTION}x this machine's {machine.cpus} CPUs")


# ---- counts of a run --------------------------------------------------------------------------
MAX_STREAMS = 10_000  # per run: the orchestrator polls, assigns and checkpoints each one and keeps a directory for it
MAX_WORKERS = 1024  # per run, on any cluster: each worker is an actor process with its own copy of the model
MAX_CHUNKS = 10**8 - 1  # chunk numbers, next_chunk included, stay within the 8-digit segment/checkpoint names
MAX_GROUP_SIZE = 64  # ranks of one generator group share one node (STRICT_PACK), one GPU each

STREAMS = Range(1, MAX_STREAMS, "streams of one run: each is polled, checkpointed and has its own directory")
WORKERS = Range(1, MAX_WORKERS, "worker processes of one run, each with its own copy of the model")
WORKER_CPUS = Range(0, 1024, "CPUs one worker reserves; no node has more", integer=False, open_lo=True)
GROUP_SIZE = Range(1, MAX_GROUP_SIZE, "ranks of a group share one node, one GPU each")
CHUNKS = Range(1, MAX_CHUNKS, "chunk numbers are the 8-digit segment and checkpoint names")
KEEP = Range(1, MAX_CHUNKS, "a count of chunk-numbered files; more than there can be chunks keeps them all")
STREAMS_PER_WORKER = Range(1, MAX_STREAMS, "a worker holds at most the streams of a run")
SEED = Range(0, INT64_MAX, "seeds are int64")

# ---- video and text ---------------------------------------------------------------------------
MAX_FRAME_SIDE = 4096  # pixels of a written frame's side (4K); an RGB frame is then at most 48 MiB
MAX_PROMPT_BYTES = 16 * 1024  # UTF-8 bytes of one prompt: umT5 reads 512 tokens (~2 KiB of text) anyway

UPSCALE = Range(1, 16, "nearest-neighbour copies per pixel side; a written frame is at most 4096 px a side too")
FRAME_SIDE = Range(1, MAX_FRAME_SIDE, "a 4K frame; attention cost grows with the square of the tokens")

# ---- files read whole -------------------------------------------------------------------------
MAX_INPUT_FILE_BYTES = 16 * 2**20  # spec / config / trajectory files: read whole; 10,000 streams with 1 KiB prompts fit

# ---- dashboard --------------------------------------------------------------------------------
DASHBOARD_PORT = Range(0, 65535, "TCP ports; 0 picks a free one")
STALL_TIMEOUT = Range(
    5, 7 * 86400, "below 5 s a checkpoint or worker restart reads as a stall; a week is beyond any step", integer=False
)
MAX_ALLOW_HOSTS = 64  # --dashboard-allow-host entries: every request's Host header is compared against them
MAX_HOST_NAME = 253  # characters of a DNS host name (RFC 1035)

# ---- model and rollout (ModelConfig fields; flags and --config files) ---------------------------
MAX_DENOISING_STEPS = 1000  # timesteps lie in (0, 1000]: the schedulers' 1000 training steps
ROLLOUT = {
    "sink_frames": Range(0, 1024, "latent frames kept forever; the public models use 0..3"),
    "window_frames": Range(1, 4096, "latent frames of the window ring, all attended every step; models use <= 21"),
    "frames_per_chunk": Range(1, 64, "latent frames denoised together in one pass; models use 3"),
    "memory_frames": Range(0, 4096, "retrieved latent frames attended every step"),
    "memory_exclude_recent": Range(0, MAX_CHUNKS, "a count of chunks"),
    "max_temporal_id": Range(1, 10**6, "temporal ids of the 3-D RoPE; models are trained below 100"),
    "text_len": Range(1, 4096, "prompt tokens padded per stream; umT5 reads 512"),
    "shift": Range(0, 100, "beyond 100 every step stays at pure noise; models use 1..8", integer=False, open_lo=True),
}
MODEL_FLAGS = {
    **{k: ROLLOUT[k] for k in ("sink_frames", "window_frames", "frames_per_chunk", "shift")},
    "latent_dim": Range(1, 65536, "d_c, the MLA latent width; at most the model width"),
    "rope_dim": Range(1, 65536, "d_r, the MLA RoPE key width"),
    "height": FRAME_SIDE,
    "width": FRAME_SIDE,
}
FLAG_NOTES = {"latent_dim": "d_c", "rope_dim": "d_r"}  # named in the message (the model's own checks use them)
WORLD_FLAGS = {"world": SEED}

HOT_TIER_ROWS = Range(1, 2**26, "chunk embeddings held in process per stream; 2**26 rows are 22 GB")

# ---- the subcommands' own flags ---------------------------------------------------------------
RUN_FLAGS = {
    "hot_tier_rows": HOT_TIER_ROWS,
    "streams": STREAMS,
    "chunks": CHUNKS,
    "workers": WORKERS,
    "checkpoint_every": CHUNKS,
    "segment_chunks": CHUNKS,
    "keep_checkpoints": KEEP,
    "keep_segments": KEEP,
    "streams_per_worker": STREAMS_PER_WORKER,
    "worker_cpus": WORKER_CPUS,
    "group_size": GROUP_SIZE,
    "seed": SEED,
    "upscale": UPSCALE,
    "dashboard_port": DASHBOARD_PORT,
    "stall_timeout": STALL_TIMEOUT,
    "decode_actors": Range(0, 64, "VAE decode actors per worker, each with its own VAE (and GPU where there are GPUs)"),
}
GENERATE_FLAGS = {
    "hot_tier_rows": HOT_TIER_ROWS,
    "frames": Range(1, INT64_MAX, "frame counts are int64"),  # then: the chunks they need, see MAX_CHUNKS
    "chunks": CHUNKS,
    "seed": SEED,
    "upscale": UPSCALE,
}  # --threads: threads_range(this_machine())
PLAN_FLAGS = {
    "hot_tier_rows": HOT_TIER_ROWS,
    "hours": Range(0, 24 * 365 * 10, "ten years of one stream", integer=False, open_lo=True),
}
MAX_GPU_MEM = 2**44  # --gpu-mem: 16 TiB; accelerators hold a few hundred GB, anything near this is a typo
TRAIN_WORLD_FLAGS = {
    "steps": Range(1, 10**7, "every step's loss is kept in memory and in meta.json"),
    "batch": Range(1, 4096, "the contexts of one step are in memory together"),
    "lr": Range(0, 1, "AdamW diverges long before a learning rate of 1", integer=False, open_lo=True),
}  # --threads: threads_range(this_machine())
TRAIN_EMBEDDER_FLAGS = {
    "steps": Range(1, 10**7, "optimizer steps; 200 train the shipped embedder"),
    "embedding_dim": Range(1, 4096, "floats per chunk embedding, stored with every chunk"),
    "seed": SEED,
}
