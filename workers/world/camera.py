"""What the rollout core asks of a stream's camera: poses, actions, its world's true views, pose keys.

Only world-model streams have a camera (``StreamSpec.trajectory``); for every other stream poses are
None, actions are zeros and nothing here runs. The generator holds one ``StreamCamera``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from workers.config import ModelConfig
from workers.types import StreamSpec
from workers.world.render import WorldConfig, render_world, views
from workers.world.trajectory import trajectory_of

WORLD_CACHE = 8  # rendered worlds kept (LRU)


class StreamCamera:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._worlds: OrderedDict[int, torch.Tensor] = OrderedDict()  # world seed -> rendered world
        self._pose_embedder = None  # retrieval keys of streams with a moving camera (built on first use)

    def poses(self, spec: StreamSpec, frames: torch.Tensor) -> torch.Tensor | None:
        """Camera poses [F, 2] (patches) of these frames of the stream, or None without a camera."""
        traj = trajectory_of(spec)
        return None if traj is None else traj.poses(frames)

    def actions(self, spec: StreamSpec, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame actions [F, action_dim] from the stream's trajectory (zeros without one)."""
        traj = trajectory_of(spec)
        out = torch.zeros(len(frames), self.cfg.action_dim)
        if traj is not None:
            out[:, :2] = traj.actions_of(frames)
        return out

    def true_views(self, world: int, poses: torch.Tensor) -> torch.Tensor:
        """True views [F, C, H, W] of procedural world ``world`` at these poses (patches)."""
        if world not in self._worlds:
            self._worlds[world] = render_world(world, WorldConfig(view=self.cfg.latent_height))
            while len(self._worlds) > WORLD_CACHE:
                self._worlds.popitem(last=False)
        return views(self._worlds[world], poses * self.cfg.patch, self.cfg.latent_height)

    def prompt_frames(self, spec: StreamSpec, chunk_index: int, frames: torch.Tensor) -> torch.Tensor | None:
        """A world stream's chunk 0 is its world's true view (the prompt); None for every other chunk."""
        if spec.world is None or chunk_index != 0:
            return None
        return self.true_views(spec.world, self.poses(spec, frames))

    def pose_keys(self, spec: StreamSpec, frames: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """(key of these frames, query of the next chunk's) by camera pose, or None if the camera does not move."""
        traj = trajectory_of(spec)
        if traj is None or not traj.moves:
            return None
        if self._pose_embedder is None:
            from memory_store.embedders import PoseEmbedder

            self._pose_embedder = PoseEmbedder(self.cfg.embedding_dim)
        emb = self._pose_embedder.embed_poses(traj.poses(frames))
        return emb, self._pose_embedder.embed_poses(traj.poses(frames + self.cfg.frames_per_chunk))
