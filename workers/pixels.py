"""Video frames from a Wan-family stream's latents: the VAE decoder, streamed chunk by chunk, per stream.

Each stream holds a :class:`~workers.models.wan.vae.StreamDecoder` (its causal-conv feature cache) in
this process only: the cache is too large to checkpoint. A stream's state instead keeps its last
``RESUME_LATENT_FRAMES`` latent frames (``StreamState.recent_latents``, a few MB), and a stream that
arrives here mid-way (resumed from a checkpoint, recovered, migrated) replays them first, which
rebuilds the cache bit for bit, so its video continues without a seam.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from workers.state import StreamState


def vae_digest(path: str) -> str:
    """A short digest of the VAE's weights files (streams are bound to the VAE that decoded them)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.suffix in (".json", ".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))  # size + first MiB: cheap, and enough to tell VAEs apart
    return h.hexdigest()[:12]


def push_history(state: StreamState, latents: torch.Tensor) -> None:
    """Append a chunk's latents to ``state.recent_latents``, keeping the last RESUME_LATENT_FRAMES."""
    from workers.models.wan.vae import RESUME_LATENT_FRAMES

    lat = latents.float().cpu()
    kept = lat if state.recent_latents is None else torch.cat([state.recent_latents, lat])
    state.recent_latents = kept[-RESUME_LATENT_FRAMES:].contiguous()


def resume_decoder(vae, stream_id: str, first_frame: int, history: torch.Tensor | None):
    """A stream's decoder, ready for its latent frame ``first_frame``: fresh at the stream start, else its cache
    rebuilt from ``history`` (the latent frames before it: all of them, or at least the last RESUME_LATENT_FRAMES)."""
    from workers.models.wan.vae import RESUME_LATENT_FRAMES, StreamDecoder

    dec = StreamDecoder(vae)
    if first_frame > 0:
        need = min(first_frame, RESUME_LATENT_FRAMES)
        have = 0 if history is None else len(history)
        if have < need:
            raise ValueError(
                f"stream {stream_id!r} at latent frame {first_frame} carries {have} latent frames of history; "
                f"the decoder needs the last {need} to continue its video"
            )
        dec.warmup(history, starts_stream=first_frame <= RESUME_LATENT_FRAMES)
    return dec


class StreamPixels:
    """The decoders of the streams this generator steps (one shared VAE, one cache per stream)."""

    def __init__(self, vae_path: str, device: torch.device, dtype: torch.dtype):
        from workers.models.wan.vae import load_vae

        self.vae = load_vae(vae_path, device=device, dtype=dtype)
        self._decoders: dict = {}

    def decode(self, state: StreamState, latents: torch.Tensor) -> torch.Tensor:
        """One chunk's latents [F, C, h, w] of ``state`` (before its next_chunk advances) -> uint8 [N, H, W, 3]."""
        dec = self._decoders.get(state.stream_id)
        if dec is None:  # new here: at the stream start, or arrived mid-way (rebuilt from its latent history)
            first = state.next_chunk * state.frames_per_chunk
            dec = resume_decoder(self.vae, state.stream_id, first, state.recent_latents)
            self._decoders[state.stream_id] = dec
        frames = dec.decode(latents)
        push_history(state, latents)
        return frames

    def forget(self, stream_id: str) -> None:
        self._decoders.pop(stream_id, None)

    def cache_nbytes(self, stream_id: str) -> int:
        dec = self._decoders.get(stream_id)
        return dec.cache_nbytes() if dec is not None else 0
