"""A worker holds no more streams than its free memory allows (plan's per-stream bytes)."""

import pytest

from orchestrator.plan import stream_budget, vae_sizes
from workers.budget import HEADROOM, capacity, stream_bytes
from workers.config import ModelConfig
from workers.messages import StreamAssignment, WorkerSettings
from workers.types import StreamSpec
from workers.worker import GeneratorWorkerImpl


def test_capacity_is_free_memory_over_the_streams_bytes_with_video_decode_counted():
    cfg = ModelConfig.from_name("self-forcing-1.3b")
    per, per_video = stream_bytes(cfg, False), stream_bytes(cfg, True)
    assert per == stream_budget(cfg).total and per_video == per + vae_sizes(cfg)[1]
    free = 80 * 10**9
    assert capacity(cfg, False, "cuda", free=free) == int(free * (1 - HEADROOM)) // per
    assert capacity(cfg, True, "cuda", free=free) < capacity(cfg, False, "cuda", free=free)
    assert capacity(cfg, True, "cuda", free=per_video - 1) == 0


def test_a_worker_refuses_a_stream_past_its_capacity(tmp_path):
    settings = WorkerSettings(out_dir=str(tmp_path), model=ModelConfig.from_name("tiny").to_dict(), memory_uri=None)
    w = GeneratorWorkerImpl("w0", settings)
    assert w.capacity is not None and w.capacity > 100  # tiny streams are small
    w.capacity = 1
    assert w.info().capacity == 1
    w.assign(StreamAssignment(StreamSpec("a"), 4))
    with pytest.raises(ValueError, match="holds 1 streams, all its memory budget"):
        w.assign(StreamAssignment(StreamSpec("b"), 4))
