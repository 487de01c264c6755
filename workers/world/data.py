"""Training contexts for the world model, shaped like the contexts the generator builds at inference.

One sample is 16 latent frames, laid out as the generator's attention context for one chunk:

    retrieval-shaped: [sink | memory chunk | memory chunk | window chunk x2 | target chunk]
    window-shaped:    [sink | window chunk x4                               | target chunk]

- the sink is frame 0 of the trajectory (the generator keeps it forever);
- memory chunks are far-back chunks of the same trajectory, picked by the rule retrieval uses at
  inference: candidates are chunks older than the window and the R most recently evicted, ranked by
  cosine similarity of their pose keys to the target chunk's (``PoseEmbedder``); sometimes random
  candidates instead, so the model learns to check where a memory frame was, not to trust it;
- temporal ids come from the same position policy (memory at the sink's id; window and target
  relative to the newest frame), camera poses from the same trajectories.

``vis[g, h]`` says whether frames of group g attend to frames of group h, mirroring inference: the
sink sees itself; a memory chunk sees the sink and itself (its rows are computed that way when it is
retrieved); a window chunk sees the sink, the memory and earlier window chunks; the target sees all.
Every draw is a pure function of (data seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from memory_store.embedders import PoseEmbedder
from workers.config import ModelConfig
from workers.world.render import WorldConfig, render_world, views
from workers.world.trajectory import Trajectory

HELD_OUT_WORLDS = 10**9  # world seeds from here on are never trained on (the quality benchmark's)


@dataclass
class Batch:
    latents: torch.Tensor  # [B, L, C, H, W] true views (clean)
    actions: torch.Tensor  # [B, L, action_dim]
    poses: torch.Tensor  # [B, L, 2] camera poses (patches)
    temporal_ids: torch.Tensor  # [B, L] from the position policy
    frame_vis: torch.Tensor  # [B, L, L] bool: frame l attends to frame m
    target: torch.Tensor  # [L] bool: the frames of the target chunk (the last chunk)


def _mix(*keys: int) -> int:
    z = 0x632BE59BD9B4E019
    for k in keys:
        z = ((z ^ (int(k) + 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        z ^= z >> 29
    return z & ((1 << 63) - 1)


class ContextSampler:
    """Draws batches of inference-shaped training contexts over procedural worlds."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, retrieval_share: float = 0.6, world_every: int = 25):
        self.cfg = cfg
        self.seed = seed
        self.retrieval_share = retrieval_share
        self.world_every = world_every  # steps a batch slot keeps its world (rendering one costs ~0.1 s)
        self.world_cfg = WorldConfig(view=cfg.latent_height)
        self.keys = PoseEmbedder(cfg.embedding_dim)
        self._worlds: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.policy = cfg.position_policy()
        f = cfg.frames_per_chunk
        self.length = 1 + cfg.memory_frames + cfg.window_frames + f
        if cfg.sink_frames != 1 or (self.length - 1 - f) % f:
            raise ValueError("the world sampler expects one sink frame and whole-chunk memory and window")
        self.window_only_chunks = (self.length - 1 - f) // f  # window-shaped samples: same frame count

    def world(self, seed: int) -> torch.Tensor:
        if seed not in self._worlds:
            self._worlds[seed] = render_world(seed, self.world_cfg)
            while len(self._worlds) > 256:
                self._worlds.popitem(last=False)
        return self._worlds[seed]

    # ---- one sample ----------------------------------------------------------------------------
    def _trajectory_poses(self, gen: torch.Generator, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses [frames, 2] and actions [frames, 2] of a random revisiting tour or a random walk."""
        if float(torch.rand((), generator=gen)) < 0.85:
            box = int(torch.randint(12, 25, (), generator=gen))
            leg = 2 * box + int(torch.randint(0, 17, (), generator=gen))
            origin = tuple(torch.randint(0, 48 - box + 1, (2,), generator=gen).tolist())
            traj = Trajectory(
                "revisit", seed=int(torch.randint(0, 2**62, (), generator=gen)),
                places=int(torch.randint(3, 6, (), generator=gen)), leg=leg, box=box, origin=origin,
            )  # fmt: skip
            idx = torch.arange(frames)
            return traj.poses(idx), traj.actions_of(idx)
        # a persistent random walk inside [0, 48]^2, one patch per frame at most on each axis
        steps = torch.zeros(frames, 2, dtype=torch.int64)
        cur = torch.randint(-1, 2, (2,), generator=gen)
        for n in range(1, frames):
            if float(torch.rand((), generator=gen)) < 0.15:
                cur = torch.randint(-1, 2, (2,), generator=gen)
            steps[n] = cur
        poses = torch.randint(8, 41, (2,), generator=gen)[None] + steps.cumsum(0)
        poses = 48 - (48 - torch.remainder(poses, 96)).abs()  # reflect into [0, 48]
        acts = torch.zeros(frames, 2)
        acts[1:] = (poses[1:] - poses[:-1]).float()
        return poses, acts

    def _memory_chunks(self, gen: torch.Generator, poses: torch.Tensor, target: int) -> list[int]:
        cfg = self.cfg
        k = cfg.retrieval_k
        last = target - cfg.window_chunks - cfg.memory_exclude_recent  # candidates: chunks < last
        f = cfg.frames_per_chunk
        if float(torch.rand((), generator=gen)) < 0.15:
            picked = torch.randperm(last, generator=gen)[:k].tolist()
        else:
            q = torch.from_numpy(self.keys.embed_poses(poses[target * f : (target + 1) * f]))
            keys = torch.stack(
                [torch.from_numpy(self.keys.embed_poses(poses[c * f : (c + 1) * f])) for c in range(last)]
            )
            picked = torch.topk(keys @ q, k).indices.tolist()
        return sorted(picked)

    def sample(self, step: int, slot: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        f = cfg.frames_per_chunk
        gen = torch.Generator().manual_seed(_mix(self.seed, step, slot))
        world_seed = 1 + _mix(self.seed, step // self.world_every, slot) % (HELD_OUT_WORLDS - 1)
        retrieval = cfg.memory_frames > 0 and float(torch.rand((), generator=gen)) < self.retrieval_share
        min_target = cfg.window_chunks + cfg.memory_exclude_recent + cfg.retrieval_k if retrieval else 4
        target = int(torch.randint(min_target, 120, (), generator=gen))
        poses_all, acts_all = self._trajectory_poses(gen, (target + 1) * f)
        chunk = lambda c: list(range(c * f, (c + 1) * f))  # noqa: E731
        groups: list[tuple[str, list[int]]] = [("sink", [0])]
        if retrieval:
            groups += [("memory", chunk(c)) for c in self._memory_chunks(gen, poses_all, target)]
            groups += [("local", chunk(c)) for c in range(target - cfg.window_chunks, target)]
        else:
            groups += [("local", chunk(c)) for c in range(target - self.window_only_chunks, target)]
        groups.append(("target", chunk(target)))
        frames = torch.tensor([fr for _, fs in groups for fr in fs])
        newest = int(frames[-1])
        tids = torch.cat([
            self.policy.temporal_ids(torch.tensor(fs), "local" if kind == "target" else kind, newest)
            for kind, fs in groups
        ])  # fmt: skip
        # group-level visibility, then expanded to frames
        kinds = [kind for kind, _ in groups]
        n = len(groups)
        vis = torch.zeros(n, n, dtype=torch.bool)
        for g, kind in enumerate(kinds):
            vis[g, 0] = vis[g, g] = True
            if kind in ("local", "target"):
                vis[g, :g] = True  # sink, memory and earlier window chunks
        sizes = torch.tensor([len(fs) for _, fs in groups])
        frame_vis = vis.repeat_interleave(sizes, 0).repeat_interleave(sizes, 1)  # (L, L)
        world = self.world(world_seed)
        return {
            "latents": views(world, poses_all[frames] * cfg.patch, cfg.latent_height),
            "actions": acts_all[frames],
            "poses": poses_all[frames],
            "temporal_ids": tids,
            "frame_vis": frame_vis,
        }

    def batch(self, step: int, size: int) -> Batch:
        rows = [self.sample(step, j) for j in range(size)]
        stacked = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        target = torch.zeros(self.length, dtype=torch.bool)
        target[-self.cfg.frames_per_chunk :] = True
        return Batch(target=target, **stacked)
