"""Checkpoint store: atomic commit record, checksums, keep-last-N, fallback past invalid ones (logged)."""

import json

import pytest
import torch
from structlog.testing import capture_logs

from workers.checkpoints import CheckpointStore
from workers.config import ModelConfig
from workers.generator import Generator
from workers.types import StreamSpec


@pytest.fixture(scope="module")
def gen():
    return Generator(ModelConfig.from_name("tiny"))


def advance(gen, state, n):
    for _ in range(n):
        gen.step([state])


@pytest.mark.parametrize("uri_kind", ["path", "file-uri"])
def test_roundtrip_keep_last_n(gen, tmp_path, uri_kind):
    root = str(tmp_path) if uri_kind == "path" else f"file://{tmp_path}"
    store = CheckpointStore(root, "s1", keep=2)
    state = gen.new_stream(StreamSpec("s1", seed=3))
    for _ in range(3):
        advance(gen, state, 2)
        store.save(state, {"memory_table_version": state.next_chunk})
    assert store.chunks() == [4, 6]
    loaded, skipped = store.load_latest()
    assert skipped == () and loaded.chunk == 6 and loaded.extra == {"memory_table_version": 6}
    assert torch.equal(gen.step([loaded.state])[0].latents, gen.step([state])[0].latents)


@pytest.mark.parametrize("damage", ["payload", "meta", "missing-meta"])
def test_corrupt_newest_falls_back_and_logs(gen, tmp_path, damage):
    store = CheckpointStore(str(tmp_path), "s1", keep=3)
    state = gen.new_stream(StreamSpec("s1"))
    advance(gen, state, 1)
    store.save(state)
    advance(gen, state, 1)
    store.save(state)
    newest = tmp_path / "s1" / "checkpoints" / "00000002"
    if damage == "payload":
        blob = bytearray((newest / "state.safetensors").read_bytes())
        blob[-1] ^= 1
        (newest / "state.safetensors").write_bytes(bytes(blob))
    elif damage == "meta":
        meta = json.loads((newest / "meta.json").read_text())
        meta["next_chunk"] = 7
        (newest / "meta.json").write_text(json.dumps(meta))
    else:
        (newest / "meta.json").unlink()  # crashed between payload and commit record
    with capture_logs() as logs:
        loaded, skipped = store.load_latest()
    assert loaded.chunk == 1 and len(skipped) == 1 and skipped[0].startswith("2: ")
    assert [entry["event"] for entry in logs] == ["checkpoint.invalid", "checkpoint.fallback"]
    assert logs[0]["stream_id"] == "s1" and logs[0]["chunk_index"] == 2


def test_no_valid_checkpoint_starts_fresh(gen, tmp_path):
    store = CheckpointStore(str(tmp_path), "s1")
    assert store.load_latest() == (None, ())
