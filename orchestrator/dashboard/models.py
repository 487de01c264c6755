"""Response and request bodies of the dashboard's JSON API (they make its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StreamSummary(BaseModel):
    id: str
    state: str = Field(description="pending | running | paused | done | stopped | failed")
    next_chunk: int = Field(description="chunks generated so far")
    target_chunks: int | None = Field(description="None: runs until stopped")
    frames: int | None = Field(description="video frames generated so far (None until a step reported)")
    worker_id: str | None = Field(description="the worker holding the stream now")
    fps: float = Field(description="frames per second over the last few seconds")
    step_ms: float | None = Field(description="wall time of the newest batched step")
    retrieval_ms: float | None = Field(description="time the newest step waited for memory retrieval")
    cache_bytes: int = Field(description="bytes of the stream's latent KV cache")
    memory_rows: int | None = Field(description="chunks of the stream in the memory store")
    last_checkpoint: int | None = Field(description="chunk index of the newest checkpoint")
    checkpoint_age_s: float | None = Field(description="seconds since that checkpoint was seen")
    preview_chunk: int | None = Field(description="chunk index of the newest preview image")


class HistoryPoint(BaseModel):
    time: float
    chunk: int
    fps: float
    step_ms: float
    retrieval_ms: float | None


class LogLine(BaseModel):
    model_config = ConfigDict(extra="allow")
    time: float
    event: str


class StreamDetail(StreamSummary):
    seed: int
    prompt: str
    history: list[HistoryPoint]
    checkpoints: list[int] = Field(description="chunk indices of the checkpoints kept")
    log: list[LogLine]


class WorkerView(BaseModel):
    id: str
    pid: int
    node_id: str
    device: str
    streams: list[str]


class RunSummary(BaseModel):
    out_dir: str
    state: str
    streams: int
    running: int
    paused: int
    workers: list[WorkerView]
    chunks: int = Field(description="chunks generated since the orchestrator (re)started")
    frames: int
    fps: float = Field(description="frames per second of all streams together, recent")
    recoveries: int
    error: str | None


class ControlBody(BaseModel):
    """Optional body of POST /api/streams/{id}/pause|resume|stop."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=200, description="written to the stream's log")


class ControlResult(BaseModel):
    id: str
    action: str
    state: str


class Problem(BaseModel):
    detail: str
