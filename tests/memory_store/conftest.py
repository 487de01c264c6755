from __future__ import annotations

import multiprocessing as mp

import pytest

from memory_store.config import MemoryStoreConfig
from tests.memory_store.procs import DIM


@pytest.fixture
def make_config(tmp_path):
    """Factory of small, fast configs on a fresh database directory under tmp_path."""

    def make(**overrides) -> MemoryStoreConfig:
        base = dict(
            uri=str(tmp_path / "memory"),
            embedding_dim=DIM,
            batch_size=16,
            flush_interval_s=0.02,
            compact_every_n_commits=1000,  # tests that want maintenance ask for it
        )
        return MemoryStoreConfig(**{**base, **overrides})

    return make


@pytest.fixture
def spawn():
    """multiprocessing context with the spawn start method (LanceDB is not fork-safe)."""
    return mp.get_context("spawn")
