"""The procedural world, camera trajectories and pose-keyed retrieval keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memory_store.embedders import PoseEmbedder
from workers.types import StreamSpec
from workers.world.render import WorldConfig, render_world, views
from workers.world.trajectory import Trajectory, trajectory_of


def test_world_is_a_function_of_its_seed():
    a, b, c = render_world(3), render_world(3), render_world(4)
    assert a.shape == (3, 256, 256) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1  # another seed is another world
    assert a.min() >= -1 and a.max() <= 1
    # distinct content: many colours, not a flat field
    assert len(torch.unique((a * 8).round().reshape(3, -1), dim=1).T) > 100


def test_views_crop_and_wrap():
    w = render_world(1, WorldConfig(size=64, view=16, num_shapes=10))
    poses = torch.tensor([[0, 0], [5, 7], [60, 62]])
    v = views(w, poses, 16)
    assert v.shape == (3, 3, 16, 16)
    assert torch.equal(v[1], w[:, 5:21, 7:23])
    rolled = torch.roll(w, shifts=(-60, -62), dims=(1, 2))  # the world wraps at its edges
    assert torch.equal(v[2], rolled[:, :16, :16])


def test_revisit_moves_one_patch_per_frame_and_returns_to_its_places():
    t = Trajectory("revisit", seed=5)
    frames = torch.arange(2000)
    poses = t.poses(frames)
    steps = (poses[1:] - poses[:-1]).abs()
    assert steps.max() <= 1 and steps.sum(dim=1).max() <= 1  # one axis at a time, one patch at most
    assert torch.equal(t.actions_of(frames)[1:], (poses[1:] - poses[:-1]).float())
    assert torch.equal(t.actions_of(frames)[0], torch.zeros(2))
    # closed form: any frame alone gives the same pose as the whole walk
    assert torch.equal(t.poses(torch.tensor([1234, 7])), poses[[1234, 7]])
    # every place comes back, far later than a local window
    starts = {tuple(p) for p in poses[:: t.leg].tolist()}
    assert len(starts) == t.places
    first: dict[tuple, int] = {}
    gaps = []
    for n, p in enumerate(map(tuple, poses.tolist())):
        if p in first and n - first[p] > 15:
            gaps.append(n - first[p])
        first.setdefault(p, n)
    assert len(gaps) > 500 and max(gaps) > 400


def test_file_trajectory_repeats_its_moves(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([[0, 1], [1, 0], [0, -2]]))
    t = Trajectory.parse(str(f))
    assert t.kind == "file" and t.actions == ((0, 1), (1, 0), (0, -2))
    poses = t.poses(torch.arange(8))
    assert poses.tolist() == [[0, 0], [0, 1], [1, 1], [1, -1], [1, 0], [2, 0], [2, -2], [2, -1]]
    assert torch.equal(t.poses(torch.tensor([7])), poses[7:8])


@pytest.mark.parametrize(
    "content, match",
    [("[[0, 1], [3, 0]]", "integers in"), ("{bad", "cannot read"), ("[]", "at least one"), ('{"x": 1}', "a list")],
)
def test_bad_trajectory_files_are_refused(tmp_path, content, match):
    f = tmp_path / "t.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        Trajectory.parse(str(f))


def test_unknown_trajectory_name():
    with pytest.raises(ValueError, match="unknown trajectory"):
        Trajectory.parse("circle")
    with pytest.raises(ValueError, match="trajectory"):
        StreamSpec("s", trajectory="circle")
    with pytest.raises(ValueError, match="world"):
        StreamSpec("s", world=3)  # a world prompt needs a camera


def test_spec_round_trips_with_its_camera():
    spec = StreamSpec("s1", seed=4, trajectory="file", actions=((0, 1), (1, 1)), world=9)
    again = StreamSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert trajectory_of(again).poses(torch.tensor([2])).tolist() == [[1, 2]]
    legacy = StreamSpec.from_dict({"stream_id": "s2", "seed": 1, "prompt": "p"})
    assert legacy.trajectory == "" and trajectory_of(legacy) is None


def test_pose_keys_rank_the_nearest_pose_first():
    emb = PoseEmbedder(64)
    query = emb.embed_poses(torch.tensor([[10, 10], [10, 11], [10, 12]]))
    cands = [(10, 11), (12, 11), (10, 16), (20, 30), (0, 0)]
    keys = np.stack([emb.embed_poses(torch.tensor([p] * 3)) for p in cands])
    sims = keys @ query
    assert np.argsort(-sims).tolist()[:3] == [0, 1, 2]
    assert abs(float(np.linalg.norm(query)) - 1) < 1e-6


def test_returns_count_only_comebacks_beyond_the_gap():
    from workers.world.trajectory import returns

    # frames 0-2 prompt at (0, 0); 3-22 wait at (1, 1); leave; back at (1, 1) at 40; prompt pose at 60
    poses = [(0, 0)] * 3 + [(1, 1)] * 20 + [(5, 5)] * 17 + [(1, 1)] + [(6, 6)] * 19 + [(0, 0)]
    pairs = returns(torch.tensor(poses), min_gap=16)
    assert pairs == [(3, 40)]  # waiting is not a return; prompt poses have no generated first visit
