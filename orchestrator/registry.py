"""The durable stream registry: ``DIR/run.json`` (run spec and state) plus each stream's manifest.

Nothing about a run lives only in memory: the Orchestrator actor rebuilds its registry from these
files in its constructor, so Ray may restart it (or the whole cluster may be restarted) at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workers.messages import WorkerSettings
from workers.output import read_manifest, write_json_atomic
from workers.types import StreamSpec

RUN_FILE = "run.json"
CONTROL_DIR = "control"
FINAL_STATES = ("done", "stopped", "failed")
NAMESPACE = "longroll"


@dataclass
class StreamEntry:
    spec: StreamSpec
    target_chunks: int | None  # None: infinite

    def to_dict(self) -> dict:
        return {**self.spec.to_dict(), "chunks": self.target_chunks}

    @classmethod
    def from_dict(cls, d: dict) -> StreamEntry:
        return cls(StreamSpec.from_dict(d), d.get("chunks"))


@dataclass
class RunSpec:
    """Everything ``longroll run`` was asked to do (written once, then only ``state`` changes)."""

    out_dir: str
    model: dict  # ModelConfig.to_dict()
    streams: list[StreamEntry]
    workers: int = 2  # GeneratorWorker actors
    checkpoint_every: int = 8
    segment_chunks: int = 8
    keep_checkpoints: int = 3
    keep_segments: int | None = None
    streams_per_worker: int | None = None  # capacity of one worker (None: no limit)
    worker_cpus: float = 1.0  # logical CPUs per worker (ignored where a GPU is used)
    group_size: int = 1  # ranks per worker: >1 makes each worker a generator group (one GPU or worker_cpus each)
    weights: str | None = None  # "shipped", "random"/None or a safetensors path
    model_source: dict | None = None  # wan family: ModelSource.to_dict() (weights, base, lora, prompt embeds)
    upscale: int = 4
    lossless: bool = False  # mp4 segments in lossless RGB (libx264rgb qp 0)
    decode_actors: int = 0  # wan + VAE: decode in this many Ray actors per worker (0: in the worker)
    checkpoint_uri: str | None = None
    memory_uri: str | None = None  # default DIR/memory
    memory_budget: dict = field(default_factory=dict)  # MemoryStoreConfig overrides: per-stream byte budgets
    stub: bool = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int | None = None  # None: no dashboard; 0: any free port
    dashboard_allow_hosts: list[str] = field(default_factory=list)  # Host names served beside the loopback ones
    stall_timeout_s: float = 600.0  # no chunk anywhere for this long: the run fails (exit 1)
    state: str = "running"  # running | done | stopped | failed
    error: str | None = None  # why the run failed (set when it ends)
    created_at: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return Path(self.out_dir) / RUN_FILE

    def save(self) -> None:
        d = asdict(self)
        d["streams"] = [s.to_dict() for s in self.streams]
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, d)

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> RunSpec:
        d = json.loads((Path(out_dir) / RUN_FILE).read_text())
        d["streams"] = [StreamEntry.from_dict(s) for s in d["streams"]]
        d["out_dir"] = str(Path(out_dir).resolve())
        return cls(**d)

    def worker_settings(self, log_format: str = "json", log_level: str = "info") -> WorkerSettings:
        return WorkerSettings(
            out_dir=self.out_dir,
            model=self.model,
            checkpoint_every=self.checkpoint_every,
            segment_chunks=self.segment_chunks,
            keep_checkpoints=self.keep_checkpoints,
            keep_segments=self.keep_segments,
            upscale=self.upscale,
            lossless=self.lossless,
            decode_actors=self.decode_actors,
            checkpoint_uri=self.checkpoint_uri,
            memory_uri=None if self.stub else (self.memory_uri or str(Path(self.out_dir) / "memory")),
            memory_budget=dict(self.memory_budget),
            stub=self.stub,
            group_size=self.group_size,
            weights=self.weights,
            model_source=self.model_source,
            log_format=log_format,
            log_level=log_level,
        )

    def stream_dir(self, stream_id: str) -> Path:
        return Path(self.out_dir) / "streams" / stream_id

    def manifest(self, stream_id: str) -> dict | None:
        return read_manifest(self.stream_dir(stream_id))


def actor_name(out_dir: str | os.PathLike) -> str:
    """The Orchestrator actor's name: one per output directory."""
    return "orchestrator-" + hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]


# ---- control requests (``longroll stop``): files, so they work whether or not Ray is reachable ----
def request_stop(out_dir: str | os.PathLike, stream_ids: list[str] | None) -> None:
    d = Path(out_dir) / CONTROL_DIR
    d.mkdir(parents=True, exist_ok=True)
    for name in ["all"] if stream_ids is None else stream_ids:
        (d / f"stop-{name}").touch()


def pending_stops(out_dir: str | os.PathLike) -> set[str] | None:
    """Stream ids asked to stop; None means every stream; empty set: none asked."""
    d = Path(out_dir) / CONTROL_DIR
    if not d.is_dir():
        return set()
    names = {p.name[len("stop-") :] for p in d.iterdir() if p.name.startswith("stop-")}
    return None if "all" in names else names


def clear_stops(out_dir: str | os.PathLike, stream_ids: list[str] | None = None) -> None:
    d = Path(out_dir) / CONTROL_DIR
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name.startswith("stop-") and (stream_ids is None or p.name[len("stop-") :] in stream_ids + ["all"]):
            p.unlink(missing_ok=True)
