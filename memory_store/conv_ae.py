"""A small convolutional autoencoder embedder trained on stored history (``longroll train-embedder``).

Each latent frame is encoded to a vector; a chunk's embedding is the normalized mean of its frames'.
Training minimizes reconstruction MSE plus LongLive-RAG's Window Temporal Delta loss: for frame
offsets d = 1..w inside a window of consecutive frames, a hinge ``relu(cos(z_t, z_{t-d}) - margin)``.
Consecutive frames are nearly identical, so a plain autoencoder maps them to nearly identical vectors
and retrieval keeps returning the chunk next to the window; the hinge removes that redundancy and makes
the embedding carry what changed, while the reconstruction term keeps it faithful to the content.

Weights are saved as safetensors and the architecture as JSON: no format that can execute code on load.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from memory_store.config import MemoryStoreConfig
from memory_store.db import PAYLOAD_COLUMNS, connect, open_chunk_table, read_chunk_indices, rows_to_chunks
from memory_store.embedders import check_latents, l2_normalize

log = structlog.get_logger(__name__)

FORMAT = "longroll.conv_ae/1"
WEIGHTS_FILE = "embedder.safetensors"
META_FILE = "embedder.json"


@dataclass
class ConvAEConfig:
    in_channels: int = 16  # latent channels (16 for the Wan VAE)
    dim: int = 64  # embedding size
    hidden: tuple[int, ...] = (32, 64)  # channels of the stride-2 encoder stages (decoder mirrors them)
    bottleneck: int = 4  # the decoder starts from a bottleneck x bottleneck map

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.in_channels < 1 or self.dim < 1 or self.bottleneck < 1 or not self.hidden:
            raise ValueError(f"{self.in_channels=}, {self.dim=}, {self.bottleneck=}, {self.hidden=} invalid")
        if any(h < 1 or h % 4 for h in self.hidden):
            raise ValueError(f"{self.hidden=}: every stage width must be a positive multiple of 4 (GroupNorm)")


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.SiLU())


class ConvAE(nn.Module):
    """Encoder: stride-2 conv stages -> global average pool -> linear. Decoder: linear -> bottleneck map
    -> upsampling conv stages -> conv to the latent channels -> resize to the input's H x W."""

    def __init__(self, cfg: ConvAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = [cfg.in_channels, *cfg.hidden]
        self.encoder = nn.Sequential(*[_stage(a, b, 2) for a, b in zip(chans[:-1], chans[1:])])
        self.to_embedding = nn.Linear(cfg.hidden[-1], cfg.dim)
        self.from_embedding = nn.Linear(cfg.dim, cfg.hidden[-1] * cfg.bottleneck**2)
        rev = list(reversed(cfg.hidden))
        self.decoder = nn.ModuleList([_stage(a, b, 1) for a, b in zip(rev, [*rev[1:], rev[-1]])])
        self.to_latents = nn.Conv2d(rev[-1], cfg.in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> z: [N, dim] (not normalized)."""
        h = self.encoder(x)  # (N, C, H, W) -> (N, C', H', W')
        return self.to_embedding(h.mean(dim=(2, 3)))  # (N, C', H', W') -> (N, C') -> (N, dim)

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b = self.cfg.bottleneck
        h = self.from_embedding(z).view(len(z), -1, b, b)  # (N, dim) -> (N, C', b, b)
        for stage in self.decoder:
            h = stage(F.interpolate(h, scale_factor=2, mode="nearest"))
        return F.interpolate(self.to_latents(h), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z, x.shape[-2:]), z


def window_temporal_delta_loss(z: torch.Tensor, window: int, margin: float) -> torch.Tensor:
    """Window Temporal Delta loss over sequences of frame embeddings.

    Args:
        z: [B, S, D] embeddings of S consecutive frames.
        window: largest frame offset d compared (offsets 1..min(window, S-1)).
        margin: cosine similarity above which neighbours are penalized.
    Returns:
        mean over offsets of mean over pairs of relu(cos(z_t, z_{t-d}) - margin); 0 when S < 2.
    """
    if z.dim() != 3:
        raise ValueError(f"z.shape={tuple(z.shape)} must be [B, S, D]")
    w = min(window, z.shape[1] - 1)
    if w < 1:
        return z.new_zeros(())
    zn = F.normalize(z, dim=-1)
    terms = [F.relu((zn[:, d:] * zn[:, :-d]).sum(-1) - margin).mean() for d in range(1, w + 1)]
    return torch.stack(terms).mean()


class ConvAEEmbedder:
    """:class:`~memory_store.embedders.Embedder` backed by a :class:`ConvAE`."""

    def __init__(self, cfg: ConvAEConfig, model: ConvAE | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.dim = cfg.dim
        if model is None:
            torch.manual_seed(seed)
            model = ConvAE(cfg)
        self.model = model.eval()

    @torch.no_grad()
    def embed(self, latents: torch.Tensor) -> np.ndarray:
        check_latents(latents, self.cfg.in_channels)
        z = F.normalize(self.model.encode(latents.detach().to("cpu", torch.float32)), dim=-1)  # (F, dim)
        return l2_normalize(z.mean(dim=0).numpy())

    def save(self, out_dir: str | Path, **meta) -> Path:
        """Write ``embedder.safetensors`` (weights) and ``embedder.json`` (architecture, ``meta``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = out / WEIGHTS_FILE
        tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(weights))
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        doc = {"format": FORMAT, "config": asdict(self.cfg), "weights_sha256": digest, **meta}
        tmp = out / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(out / META_FILE)
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> ConvAEEmbedder:
        """Load a saved embedder. Raises ValueError on an unknown format or a weights checksum mismatch."""
        out = Path(out_dir)
        doc = json.loads((out / META_FILE).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{out / META_FILE}: format {doc.get('format')!r} is not {FORMAT!r}")
        weights = out / WEIGHTS_FILE
        if hashlib.sha256(weights.read_bytes()).hexdigest() != doc["weights_sha256"]:
            raise ValueError(f"{weights}: sha256 does not match {META_FILE}")
        cfg = ConvAEConfig(**doc["config"])
        model = ConvAE(cfg)
        model.load_state_dict(load_file(str(weights)))
        return cls(cfg, model)


@dataclass
class TrainEmbedderResult:
    out_dir: Path
    steps: int
    frames: int  # training frames loaded from the store
    first_loss: float
    final_loss: float
    final_recon: float
    final_delta: float
    losses: list[float] = field(repr=False, default_factory=list)


def _load_sequences(
    config: MemoryStoreConfig, stream_ids: Sequence[str], max_chunks_per_stream: int
) -> list[torch.Tensor]:
    """Runs of consecutive frames [T, C, H, W] from the newest ``max_chunks_per_stream`` chunks of each
    stream (split where chunk indices have gaps)."""
    db = connect(config)
    seqs = []
    for sid in stream_ids:
        table = open_chunk_table(db, sid, config.embedding_dim)
        ci = read_chunk_indices(table)
        if len(ci) == 0:
            continue
        lo = int(ci[max(0, len(ci) - max_chunks_per_stream)])
        t = table.search().where(f"chunk_index >= {lo}").select(PAYLOAD_COLUMNS).to_arrow()
        chunks = sorted(rows_to_chunks(t, sid), key=lambda c: c.chunk_index)
        run = [chunks[0].latents]
        for prev, cur in zip(chunks, chunks[1:]):
            if cur.chunk_index != prev.chunk_index + 1:
                seqs.append(torch.cat(run))
                run = []
            run.append(cur.latents)
        seqs.append(torch.cat(run))  # (sum F, C, H, W)
    shapes = {tuple(s.shape[1:]) for s in seqs}
    if len(shapes) > 1:
        raise ValueError(f"streams have different latent frame shapes {sorted(shapes)}")
    return seqs


@contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_embedder(
    uri: str,
    stream_ids: Sequence[str],
    steps: int,
    *,
    out_dir: str | Path,
    embedding_dim: int = 64,
    hidden: tuple[int, ...] = (32, 64),
    seq_len: int = 8,
    window: int = 4,
    margin: float = 0.85,
    delta_weight: float = 1.0,
    batch_size: int = 8,
    lr: float = 1e-3,
    max_chunks_per_stream: int = 4096,
    seed: int = 0,
    num_threads: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> TrainEmbedderResult:
    """Train a :class:`ConvAEEmbedder` on the latents stored for ``stream_ids`` and save it to ``out_dir``.

    Each step samples ``batch_size`` windows of ``seq_len`` consecutive frames and minimizes
    ``MSE(reconstruction) + delta_weight * WindowTemporalDelta(window, margin)``.

    Args:
        uri: the LanceDB database (as in ``MemoryStoreConfig.uri``).
        stream_ids: streams whose history is the training set.
        steps: optimizer steps.
        out_dir: receives ``embedder.safetensors`` and ``embedder.json``.
        embedding_dim: the store's embedding size (the trained embedder outputs this size).
        max_chunks_per_stream: newest chunks read per stream (bounds memory on day-long streams).
        num_threads: torch CPU threads while training (restored afterwards); None leaves them as they are.
            The model is small: on a busy machine one thread is often faster than several.
    Returns:
        a :class:`TrainEmbedderResult` with the loss trajectory.
    Raises:
        ValueError: bad arguments, no stored frames, or streams with different latent shapes.
        UnknownStreamError: a stream has no table.
    """
    if steps < 1 or seq_len < 2 or window < 1 or batch_size < 1:
        raise ValueError(f"{steps=}, {seq_len=}, {window=}, {batch_size=}: need steps, window, batch >= 1, seq >= 2")
    if not stream_ids:
        raise ValueError("stream_ids is empty")
    config = MemoryStoreConfig(uri=uri, embedding_dim=embedding_dim, storage_options=storage_options)
    seqs = [s for s in _load_sequences(config, stream_ids, max_chunks_per_stream) if len(s) >= seq_len]
    if not seqs:
        raise ValueError(f"no run of {seq_len} consecutive stored frames in streams {list(stream_ids)}")
    with _torch_threads(num_threads):
        cfg = ConvAEConfig(in_channels=seqs[0].shape[1], dim=embedding_dim, hidden=hidden)
        emb = ConvAEEmbedder(cfg, seed=seed)
        model = emb.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        weights = torch.tensor([len(s) - seq_len + 1 for s in seqs], dtype=torch.float64)
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(steps):
            picks = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
            batch = []
            for p in picks.tolist():
                start = int(torch.randint(0, len(seqs[p]) - seq_len + 1, (1,), generator=gen))
                batch.append(seqs[p][start : start + seq_len])
            x = torch.stack(batch)  # (B, S, C, H, W)
            b, s = x.shape[:2]
            recon, z = model(x.flatten(0, 1))  # (B*S, C, H, W) -> (B*S, C, H, W), (B*S, dim)
            recon_loss = F.mse_loss(recon, x.flatten(0, 1))
            delta_loss = window_temporal_delta_loss(z.view(b, s, -1), window, margin)  # (B*S, dim) -> (B, S, dim)
            loss = recon_loss + delta_weight * delta_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            recon_v, delta_v = float(recon_loss.detach()), float(delta_loss.detach())
            losses.append(recon_v + delta_weight * delta_v)
            if step % 50 == 0 or step == steps - 1:
                log.info("train_embedder_step", step=step, loss=losses[-1], recon=recon_v, delta=delta_v)
    model.eval()
    frames = sum(len(s) for s in seqs)
    emb.save(
        out_dir,
        trained_at=datetime.now(UTC).isoformat(),
        steps=steps,
        frames=frames,
        stream_ids=list(stream_ids),
        losses={"first": losses[0], "final": losses[-1]},
        hyper={
            "seq_len": seq_len,
            "window": window,
            "margin": margin,
            "delta_weight": delta_weight,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
        },
        seconds=round(time.perf_counter() - t0, 3),
    )
    return TrainEmbedderResult(Path(out_dir), steps, frames, losses[0], losses[-1], recon_v, delta_v, losses)
