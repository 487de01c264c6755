from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memory_store.embedders import (
    ConvAEConfig,
    ConvAEEmbedder,
    Embedder,
    PooledProjectionEmbedder,
    train_embedder,
    window_temporal_delta_loss,
)
from memory_store.schema import ChunkRecord, UnknownStreamError
from memory_store.writer import MemoryWriter


def test_pooled_projection_is_deterministic_and_normalized():
    x = torch.randn(3, 16, 8, 10)
    a, b = PooledProjectionEmbedder(16, 64, seed=1), PooledProjectionEmbedder(16, 64, seed=1)
    ea = a.embed(x)
    assert isinstance(a, Embedder)
    assert ea.dtype == np.float32 and ea.shape == (64,)
    assert abs(np.linalg.norm(ea) - 1) < 1e-6
    np.testing.assert_array_equal(ea, b.embed(x.clone()))  # same seed, same input: same bits
    assert not np.allclose(ea, PooledProjectionEmbedder(16, 64, seed=2).embed(x))
    assert np.dot(ea, a.embed(x + 0.01 * torch.randn_like(x))) > 0.99  # small change, close embedding
    assert np.dot(ea, a.embed(torch.randn(3, 16, 8, 10))) < 0.9
    zero = a.embed(torch.zeros(1, 16, 4, 4))
    assert abs(np.linalg.norm(zero) - 1) < 1e-6
    np.testing.assert_array_equal(a.embed_batch(x[None].repeat(2, 1, 1, 1, 1))[1], ea)


def test_embedders_reject_bad_latents():
    e = PooledProjectionEmbedder(16, 8)
    with pytest.raises(ValueError, match=r"\[F, 16, H, W\]"):
        e.embed(torch.randn(3, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\[F, 16, H, W\]"):
        e.embed(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        e.embed(torch.full((1, 16, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\[F, 4, H, W\]"):
        ConvAEEmbedder(ConvAEConfig(in_channels=4, dim=8, hidden=(8,))).embed(torch.randn(2, 3, 8, 8))


def test_window_temporal_delta_loss_values():
    z = torch.ones(2, 5, 8)  # identical frames: cosine 1 everywhere
    assert window_temporal_delta_loss(z, window=3, margin=0.85).item() == pytest.approx(0.15)
    eye = torch.eye(8)[None, :5]  # orthogonal frames: cosine 0 < margin
    assert window_temporal_delta_loss(eye, window=3, margin=0.85).item() == 0.0
    assert window_temporal_delta_loss(torch.ones(2, 1, 8), window=3, margin=0.5).item() == 0.0
    # only pairs within the window count: frames 0 and 3 are identical, the rest orthogonal
    z = torch.eye(8)[None, [0, 1, 2, 0]]
    assert window_temporal_delta_loss(z, window=2, margin=0.5).item() == 0.0
    assert window_temporal_delta_loss(z, window=3, margin=0.5).item() == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match=r"\[B, S, D\]"):
        window_temporal_delta_loss(torch.ones(5, 8), 2, 0.5)


def _write_video(cfg, stream_id: str, n_chunks: int, seed: int) -> None:
    """A slowly drifting latent 'video' (2 frames per chunk): neighbouring frames are nearly equal."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 8, 8, generator=g)
    drift = torch.randn(4, 8, 8, generator=g)
    emb = PooledProjectionEmbedder(4, cfg.embedding_dim)
    with MemoryWriter(cfg) as w:
        for i in range(n_chunks):
            t = torch.tensor([2 * i, 2 * i + 1], dtype=torch.float32)[:, None, None, None] / (2 * n_chunks)
            lat = base + 3 * t * drift + 0.05 * torch.randn(2, 4, 8, 8, generator=g)  # (F, C, H, W)
            w.put(ChunkRecord(stream_id, i, 2 * i, 2, emb.embed(lat), lat, "m0"))


def test_train_embedder_end_to_end(make_config, tmp_path):
    cfg = make_config(embedding_dim=16)
    _write_video(cfg, "a", 40, seed=0)
    _write_video(cfg, "b", 30, seed=1)
    out = tmp_path / "embedder"
    res = train_embedder(
        cfg.uri,
        ["a", "b"],
        steps=60,
        out_dir=out,
        embedding_dim=16,
        hidden=(8, 16),
        seq_len=6,
        window=3,
        batch_size=4,
        lr=3e-3,
        num_threads=1,
    )
    assert res.frames == 140 and res.steps == 60
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])  # it learns
    assert sorted(p.name for p in out.iterdir()) == ["embedder.json", "embedder.safetensors"]
    meta = json.loads((out / "embedder.json").read_text())
    assert meta["format"] == "longroll.conv_ae/1" and meta["stream_ids"] == ["a", "b"]
    loaded = ConvAEEmbedder.load(out)
    x = torch.randn(2, 4, 8, 8)
    e = loaded.embed(x)
    assert e.shape == (16,) and abs(np.linalg.norm(e) - 1) < 1e-5
    np.testing.assert_array_equal(ConvAEEmbedder.load(out).embed(x), e)  # reloading is exact
    assert not np.array_equal(ConvAEEmbedder(loaded.cfg, seed=0).embed(x), e)  # and it is the trained one
    (out / "embedder.safetensors").write_bytes((out / "embedder.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        ConvAEEmbedder.load(out)


def test_train_embedder_bad_input(make_config, tmp_path):
    cfg = make_config(embedding_dim=16)
    _write_video(cfg, "a", 3, seed=0)
    with pytest.raises(UnknownStreamError):
        train_embedder(cfg.uri, ["ghost"], steps=1, out_dir=tmp_path / "e", embedding_dim=16)
    with pytest.raises(ValueError, match="no run of 8 consecutive"):
        train_embedder(cfg.uri, ["a"], steps=1, out_dir=tmp_path / "e", embedding_dim=16, seq_len=8)
    with pytest.raises(ValueError, match="steps=0"):
        train_embedder(cfg.uri, ["a"], steps=0, out_dir=tmp_path / "e", embedding_dim=16)
