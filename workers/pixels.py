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


class StreamPixels:
    """The decoders of the streams this generator steps (one shared VAE, one cache per stream)."""

    def __init__(self, vae_path: str, device: torch.device, dtype: torch.dtype):
        from workers.models.wan.vae import RESUME_LATENT_FRAMES, load_vae

        self.vae = load_vae(vae_path, device=device, dtype=dtype)
        self.keep = RESUME_LATENT_FRAMES
        self.digest = vae_digest(vae_path)
        self._decoders: dict = {}

    def decode(self, state: StreamState, latents: torch.Tensor) -> torch.Tensor:
        """One chunk's latents [F, C, h, w] of ``state`` (before its next_chunk advances) -> uint8 [N, H, W, 3]."""
        from workers.models.wan.vae import StreamDecoder

        dec = self._decoders.get(state.stream_id)
        if dec is None:
            dec = self._decoders[state.stream_id] = StreamDecoder(self.vae)
            if state.next_chunk > 0:  # arrived mid-way: rebuild the cache from the latent history
                history = state.recent_latents
                first = state.next_chunk * state.frames_per_chunk
                if history is None or len(history) < min(first, self.keep):
                    have = 0 if history is None else len(history)
                    raise ValueError(
                        f"stream {state.stream_id!r} at chunk {state.next_chunk} carries {have} latent frames of "
                        f"history; the decoder needs the last {min(first, self.keep)} to continue its video"
                    )
                dec.warmup(history, starts_stream=first <= self.keep)
        frames = dec.decode(latents)
        push_history(state, latents)
        return frames

    def forget(self, stream_id: str) -> None:
        self._decoders.pop(stream_id, None)

    def cache_nbytes(self, stream_id: str) -> int:
        dec = self._decoders.get(stream_id)
        return dec.cache_nbytes() if dec is not None else 0
