"""Typed messages between the Orchestrator actor and GeneratorWorker actors (no raw dicts cross actors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.types import StreamSpec


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a GeneratorWorker needs to build its generator and its sinks (constructor argument)."""

    out_dir: str  # run directory: streams/<id>/{manifest.json,segments/}
    model: dict  # ModelConfig.to_dict()
    checkpoint_every: int = 8  # checkpoint after every K chunks (K is a multiple of segment_chunks)
    segment_chunks: int = 8  # chunks per mp4 segment
    keep_checkpoints: int = 3  # newest checkpoints kept per stream
    keep_segments: int | None = None  # newest segments kept per stream (None: all)
    upscale: int = 4  # nearest-neighbour upscale of written frames
    crf: int = 0  # x264 CRF; 0 = lossless, so a regenerated segment decodes to the same frames
    decode_actors: int = 0  # >0: VAE decoding in that many Ray actors per worker (workers.decode_pool)
    lossless: bool = False  # RGB losslessly (libx264rgb qp 0): decoded frames equal the generator's uint8 frames
    checkpoint_uri: str | None = None  # pyarrow.fs URI or path of the checkpoint root (default out_dir/streams)
    memory_uri: str | None = None  # LanceDB URI of the memory store (None: chunks are not stored)
    memory_budget: dict = field(default_factory=dict)  # MemoryStoreConfig overrides (per-stream byte budgets)
    threads: int = 1  # torch CPU threads of the worker
    stub: bool = False  # benchmarks: fake chunks, no model, no files
    write_output: bool = True  # benchmarks: False = no segments, manifests or checkpoints
    log_format: str = "json"
    log_level: str = "info"
    preview_every_s: float | None = 0.5  # how often a stream's newest frame is sent as a PNG (None: never)
    group_size: int = 1  # ranks of one generator (1: a single process; >1: workers.group.GroupLeader)
    weights: str | None = None  # "shipped", "random"/None or a safetensors path (workers.weights.resolve)
    model_source: dict | None = None  # wan family: workers.models.source.ModelSource.to_dict() (weights parts)


@dataclass(frozen=True)
class StreamAssignment:
    """Take over a stream: load its newest valid checkpoint (or start it at chunk 0) and step it."""

    spec: StreamSpec
    target_chunks: int | None  # None: infinite, runs until stopped


@dataclass(frozen=True)
class Assigned:
    stream_id: str
    start_chunk: int  # first chunk this worker generates (= the checkpoint it loaded, or 0)
    checkpoint: int | None  # chunk of the loaded checkpoint, None when started fresh
    skipped: tuple[str, ...] = ()  # invalid newer checkpoints that were passed over, with reasons
    done: bool = False  # the stream was found at its target: nothing to generate, the worker does not hold it


@dataclass(frozen=True)
class StreamProgress:
    stream_id: str
    next_chunk: int  # chunks generated so far (in this worker's memory; durable up to last_checkpoint)
    chunks_done: int  # chunks in closed segments (durable output)
    last_checkpoint: int | None
    state: str  # running | done | stopped | paused | released
    # telemetry of the step that produced this progress (dashboard and metrics)
    frames: int = 0  # video frames this stream produced in the step
    cache_bytes: int = 0  # bytes of the stream's latent KV cache
    memory_rows: int | None = None  # chunks of the stream in the memory store (None: no store)
    retrieval_ms: float | None = None  # time the step waited for the stream's memory retrieval
    preview: bytes | None = None  # PNG of the newest frame (sent at most every WorkerSettings.preview_every_s)


@dataclass(frozen=True)
class StepReport:
    """Result of one batched step: every held stream advanced by one chunk (finished ones are dropped)."""

    worker_id: str
    streams: tuple[StreamProgress, ...]
    chunks: int  # chunks generated in this step
    frames: int  # video frames generated in this step
    seconds: float  # wall time of the step inside the worker
    checkpoints: int = 0  # checkpoints written in this step


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    pid: int
    node_id: str
    device: str
    stream_ids: tuple[str, ...] = field(default=())
    capacity: int | None = None  # streams its free memory holds (workers.budget); None: not limited


@dataclass(frozen=True)
class StreamStatus:
    stream_id: str
    state: str  # pending | running | paused | done | stopped | failed
    next_chunk: int
    target_chunks: int | None
    worker_id: str | None
    last_checkpoint: int | None


@dataclass(frozen=True)
class Recovery:
    """A worker that died or whose node was lost, and when each of its streams produced again."""

    worker_id: str
    node_id: str
    reason: str
    lost_at: float  # time.time() when the orchestrator noticed
    streams: tuple[str, ...]
    resumed_at: float | None  # when the last of those streams produced its first chunk again


@dataclass(frozen=True)
class RunProgress:
    """Snapshot of a run, from the Orchestrator actor to the CLI."""

    state: str  # starting | running | done | stopped | failed
    streams: tuple[StreamStatus, ...]
    workers: tuple[WorkerInfo, ...]
    chunks: int  # chunks generated since this orchestrator (re)started
    frames: int
    started_at: float
    control_seconds: float  # time the orchestrator spent outside waits (its overhead)
    recoveries: tuple[Recovery, ...] = ()
    error: str | None = None
    dashboard_url: str | None = None  # where the run's web dashboard listens (None: no dashboard)
    fatal: str | None = None  # why the run failed or is failing (the driver prints it as its `error:` line)


@dataclass(frozen=True)
class StreamHandoff:
    """A stream moving directly between workers (``export_streams`` -> ``import_streams``), no checkpoint.

    The state travels as safetensors bytes in Ray's object store (``payload``, an ObjectRef owned by the
    exporting worker) plus its JSON meta (with the payload sha256, verified on import).
    """

    stream_id: str
    target_chunks: int | None
    last_checkpoint: int | None  # newest checkpoint on storage (the fallback if the move fails)
    meta_json: str  # StreamState.to_bytes() meta, as JSON
    payload: object  # ray.ObjectRef of the StreamState.to_bytes() safetensors bytes
    nbytes: int = 0  # size of the payload
