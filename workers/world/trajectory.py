"""Camera trajectories: the per-frame actions a world-model stream is conditioned on.

Poses and actions are in patch units (one unit = one token = ``patch`` pixels), as integer (dy, dx).
The action of frame n is ``pose(n) - pose(n-1)`` (zero for frame 0). Every trajectory gives the pose
of any frame in closed form, without walking the frames before it, so a stream resumed at frame
1,000,000 costs the same as one at frame 0, and chunk i's actions depend only on (spec, i).

Built-ins:
- ``still``: the camera never moves.
- ``revisit``: the camera tours a few places of the world (seeded), one leg of ``leg`` frames per move
  (first along x, then along y, one patch per frame, then it waits). Places are visited in a fresh
  random order every round, so the camera leaves each place for several legs (far longer than the
  local window) and comes back to exactly the same pose.
- a file: a JSON list of per-frame ``[dy, dx]`` actions, repeated when the stream outlives it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

BUILTINS = ("still", "revisit")
MAX_STEP = 2  # largest |dy| or |dx| per frame accepted from a file (patches)


def _rng(*keys: int) -> torch.Generator:
    mixed = 0x9E3779B97F4A7C15
    for k in keys:
        mixed = (mixed * 0xBF58476D1CE4E5B9 + int(k) + 1) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class Trajectory:
    """A camera path. ``kind`` is a built-in name or ``"file"`` (then ``actions`` holds it)."""

    kind: str = "still"
    seed: int = 0  # places and visiting order of ``revisit``
    actions: tuple[tuple[int, int], ...] = ()  # ``file``: per-frame (dy, dx), repeated
    places: int = 4  # revisit: how many places
    leg: int = 48  # revisit: frames per move between two places
    box: int = 24  # revisit: places lie in a box of this many patches (and start at ``origin``)
    origin: tuple[int, int] = (8, 8)  # revisit: top-left of that box (patches)
    _places: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _prefix: torch.Tensor | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in (*BUILTINS, "file"):
            raise ValueError(f"unknown trajectory {self.kind!r}: choose {', '.join(BUILTINS)} or a .json file")
        if self.kind == "file":
            if not self.actions:
                raise ValueError("a trajectory file needs at least one action")
            for a in self.actions:
                if len(a) != 2 or any(not isinstance(v, int) or abs(v) > MAX_STEP for v in a):
                    raise ValueError(f"each action must be [dy, dx] integers in [-{MAX_STEP}, {MAX_STEP}], got {a!r}")
        if self.places < 2 or self.leg < 2 * self.box or self.box < 1:
            raise ValueError(f"revisit needs places >= 2 and leg >= 2 * box: {self.places=} {self.leg=} {self.box=}")
        object.__setattr__(self, "_places", self._make_places() if self.kind == "revisit" else ())
        prefix = None
        if self.kind == "file":
            acts = torch.tensor(self.actions, dtype=torch.int64)  # (A, 2)
            prefix = torch.cat([torch.zeros(1, 2, dtype=torch.int64), acts.cumsum(0)])  # (A + 1, 2)
        object.__setattr__(self, "_prefix", prefix)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: str, seed: int = 0) -> Trajectory:
        """A built-in name or the path of a JSON file of ``[[dy, dx], ...]`` actions.

        Raises:
            ValueError: unknown name, unreadable or malformed file.
        """
        if value in BUILTINS:
            return cls(value, seed=seed)
        path = Path(value)
        if path.suffix != ".json":
            raise ValueError(f"unknown trajectory {value!r}: choose {', '.join(BUILTINS)} or a .json file of actions")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read trajectory file {value}: {e}") from None
        if isinstance(data, dict):
            data = data.get("actions")
        if not isinstance(data, list):
            raise ValueError(f"trajectory file {value} must hold a list of [dy, dx] actions")
        return cls("file", seed=seed, actions=tuple(tuple(a) if isinstance(a, list) else (a,) for a in data))

    def _make_places(self) -> tuple[tuple[int, int], ...]:
        gen = _rng(self.seed, 7)
        chosen: list[tuple[int, int]] = []
        for _ in range(200 * self.places):  # rejection sampling: places at least a view apart
            if len(chosen) == self.places:
                break
            y, x = (torch.randint(0, self.box + 1, (2,), generator=gen) + torch.tensor(self.origin)).tolist()
            if all(max(abs(y - py), abs(x - px)) >= 9 for py, px in chosen):
                chosen.append((y, x))
        while len(chosen) < self.places:  # tiny boxes: accept overlap rather than fail
            chosen.append(
                tuple((torch.randint(0, self.box + 1, (2,), generator=gen) + torch.tensor(self.origin)).tolist())
            )
        return tuple(chosen)

    # ---- poses and actions ---------------------------------------------------------------------
    def _place_index(self, k: torch.Tensor) -> torch.Tensor:
        """Which place leg k starts from: round r = k // places visits a seeded permutation."""
        n = self.places
        rounds, pos = torch.div(k, n, rounding_mode="floor"), torch.remainder(k, n)
        out = torch.empty_like(k)
        for r in rounds.unique().tolist():
            perm = torch.randperm(n, generator=_rng(self.seed, 11, r))
            sel = rounds == r
            out[sel] = perm[pos[sel]]
        return out

    def poses(self, frames: torch.Tensor) -> torch.Tensor:
        """[N] int64 frame indices -> [N, 2] int64 (y, x) poses in patches."""
        frames = frames.to(torch.int64)
        if self.kind == "still":
            return torch.zeros(len(frames), 2, dtype=torch.int64)
        if self.kind == "file":
            a = len(self.actions)
            # pose(n) = actions[0] + ... + actions[n-1]: action i moves the camera from frame i to i + 1
            laps, rest = torch.div(frames, a, rounding_mode="floor"), torch.remainder(frames, a)
            return laps[:, None] * self._prefix[-1][None] + self._prefix[rest] - self._prefix[:1]
        places = torch.tensor(self._places, dtype=torch.int64)  # (P, 2)
        leg = torch.div(frames, self.leg, rounding_mode="floor")
        t = torch.remainder(frames, self.leg)
        a = places[self._place_index(leg)]  # (N, 2) start of the leg
        b = places[self._place_index(leg + 1)]  # (N, 2) its end
        d = b - a
        # x first, one patch per frame, then y, then wait at b
        sx = torch.clamp(t, max=d[:, 1].abs())
        sy = torch.clamp(t - d[:, 1].abs(), min=0).minimum(d[:, 0].abs())
        return torch.stack([a[:, 0] + sy * d[:, 0].sign(), a[:, 1] + sx * d[:, 1].sign()], dim=1)

    def actions_of(self, frames: torch.Tensor) -> torch.Tensor:
        """[N] frame indices -> [N, 2] float32 actions (dy, dx) = pose(n) - pose(n - 1); 0 at frame 0."""
        frames = frames.to(torch.int64)
        prev = self.poses((frames - 1).clamp(min=0))
        return (self.poses(frames) - prev).float()

    @property
    def moves(self) -> bool:
        return self.kind != "still"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "seed": self.seed}
        if self.kind == "file":
            d["actions"] = [list(a) for a in self.actions]
        return d


def returns(poses: torch.Tensor, min_gap: int = 16, after: int = 3) -> list[tuple[int, int]]:
    """(first visit, return) frame pairs at the same pose: the quality measure of memory.

    A frame is a return only when the camera was last at that pose ``min_gap`` or more frames before
    (waiting at a place is not a return); first visits count from frame ``after`` on (the frames
    before are the prompt).

    Args:
        poses: [N, 2] poses of frames 0..N-1.
    """
    first: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    pairs = []
    for t, p in enumerate(map(tuple, poses.tolist())):
        if p in first and t - last[p] >= min_gap:
            pairs.append((first[p], t))
        elif p not in first and t >= after:
            first[p] = t
        last[p] = t
    return pairs


@lru_cache(maxsize=1024)
def _cached(kind: str, seed: int, actions: tuple[tuple[int, int], ...]) -> Trajectory:
    return Trajectory(kind, seed=seed, actions=actions)


def trajectory_of(spec) -> Trajectory | None:
    """The camera path of a :class:`~workers.types.StreamSpec` (None when it has no camera).

    A ``revisit`` path's places come from the world seed when there is one (else the stream seed), so
    streams of the same world tour the same places.
    """
    if not spec.trajectory:
        return None
    seed = spec.world if spec.world is not None else spec.seed
    return _cached(spec.trajectory, seed, spec.actions)
