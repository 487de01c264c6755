"""``--decode-actors N``: VAE decoding in a pool of Ray actors, so the generator does not wait for it.

Each stream is decoded by one actor of its worker's pool (chosen by a hash of its id), so its chunks
arrive there in order (Ray runs one caller's calls to an actor in submission order) and its feature
cache lives there. Latents travel through the object store. The worker submits chunk i's decode right
after generating it and writes its frames one step later, while chunk i + 1 is being generated; a
chunk that closes a segment (or ends the stream) is written at once, so checkpoints still sit on
segment boundaries with every frame before them committed. After an assignment (a fresh start, a
resume, a recovery or a move) the stream's first chunk carries its latent history, and the actor
rebuilds the stream's cache from it, exactly as an in-worker decoder would.
"""

from __future__ import annotations

import zlib

import ray
import torch

from workers.pixels import push_history, resume_decoder


@ray.remote(max_restarts=0, max_task_retries=0)
class DecodeActor:
    """Holds the VAE and the feature caches of the streams it decodes."""

    def __init__(self, vae_path: str, threads: int = 1):
        from workers.models.wan.vae import load_vae

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_vae(vae_path, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        self.decoders: dict = {}

    def decode(self, stream_id: str, first_frame: int, latents: torch.Tensor, restart: bool, history=None):
        """One chunk's latents [F, C, h, w] -> uint8 frames. ``restart``: the stream's first chunk after an
        assignment, whose decoder is rebuilt from ``history`` (the latent frames before it)."""
        if restart or stream_id not in self.decoders:
            self.decoders[stream_id] = resume_decoder(self.vae, stream_id, first_frame, history)
        return self.decoders[stream_id].decode(latents)

    def forget(self, stream_id: str) -> None:
        self.decoders.pop(stream_id, None)


class DecodePool:
    """A worker's decode actors, and which of its streams must send their history next."""

    def __init__(self, n: int, vae_path: str, use_gpu: bool):
        # CPU: no logical CPU is reserved (the pool shares the worker's cores); GPU: one device each
        opts = {"num_gpus": 1} if use_gpu else {"num_cpus": 0}
        self.actors = [DecodeActor.options(**opts).remote(vae_path) for _ in range(n)]
        self._fresh: set[str] = set()

    def _actor(self, stream_id: str):
        return self.actors[zlib.crc32(stream_id.encode()) % len(self.actors)]

    def open(self, stream_id: str) -> None:
        """The stream was (re)assigned here: its next chunk rebuilds its cache on the actor."""
        self._fresh.add(stream_id)

    def submit(self, state, latents: torch.Tensor, chunk_index: int):
        """Send one chunk for decoding (after the generator made it); returns the ObjectRef of its frames.
        Also appends the chunk to ``state.recent_latents`` (what the stream's checkpoints keep)."""
        sid = state.stream_id
        restart = sid in self._fresh  # the actor rebuilds the stream's decoder (and checks the history)
        history = state.recent_latents if restart else None
        self._fresh.discard(sid)
        push_history(state, latents)
        return self._actor(sid).decode.remote(sid, chunk_index * state.frames_per_chunk, latents, restart, history)

    def forget(self, stream_id: str) -> None:
        self._fresh.discard(stream_id)
        self._actor(stream_id).forget.remote(stream_id)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
