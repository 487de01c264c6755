"""A procedural 2-D world per seed, and the camera views of it that the world model is trained on.

A world is a ``size x size`` RGB image made from a seed alone (nothing is downloaded): a smooth
colour field with a fine texture underneath, and a few dozen shapes (discs, boxes, diamonds, rings)
of distinct colours, each filled with its own texture (solid, stripes at an angle, checker, dots).
The camera sees a ``view x view`` window of it; the world wraps around at its edges, so every
integer camera position has a view. Every frame's ground truth is known, which is what lets the
quality benchmark measure memory on PSNR against the truth and on consistency at revisits.

Pixel values are in [-1, 1], the tiny preset's latent range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("disc", "box", "diamond", "ring")
FILLS = ("solid", "stripes", "checker", "dots")


@dataclass(frozen=True)
class WorldConfig:
    size: int = 256  # world width and height in pixels (wraps around)
    view: int = 32  # camera viewport in pixels (the tiny preset's frame size)
    num_shapes: int = 90  # shapes scattered over the world
    min_radius: int = 5  # shape half-size range in pixels
    max_radius: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.view <= self.size:
            raise ValueError(f"{self.view=} must be in (0, {self.size=}]")
        if not 0 < self.min_radius <= self.max_radius or self.num_shapes < 0:
            raise ValueError(f"bad shape settings: {self}")


def _palette_colour(gen: torch.Generator) -> torch.Tensor:
    """A saturated colour: random hue, high saturation and value -> RGB in [0, 1]."""
    h = float(torch.rand((), generator=gen)) * 6.0
    s = 0.55 + 0.45 * float(torch.rand((), generator=gen))
    v = 0.55 + 0.45 * float(torch.rand((), generator=gen))
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return torch.tensor(rgb) + (v - c)


def _fill(kind: str, yy: torch.Tensor, xx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A [0, 1] texture over the given pixel coordinates (1 = the shape's colour, 0 = its second colour)."""
    if kind == "solid":
        return torch.ones_like(yy)
    if kind == "stripes":
        angle = float(torch.rand((), generator=gen)) * math.pi
        period = 3.0 + 4.0 * float(torch.rand((), generator=gen))
        u = xx * math.cos(angle) + yy * math.sin(angle)
        return (torch.remainder(u, period) < period / 2).float()
    if kind == "checker":
        cell = int(torch.randint(2, 5, (), generator=gen))
        return (
            (torch.div(yy, cell, rounding_mode="floor") + torch.div(xx, cell, rounding_mode="floor")) % 2 == 0
        ).float()
    # dots
    cell = int(torch.randint(4, 7, (), generator=gen))
    dy, dx = torch.remainder(yy, cell) - cell / 2, torch.remainder(xx, cell) - cell / 2
    return ((dy**2 + dx**2) > (cell / 3) ** 2).float()


def render_world(seed: int, cfg: WorldConfig = WorldConfig()) -> torch.Tensor:
    """The world of ``seed``: [3, size, size] float32 in [-1, 1]. Pure function of (seed, cfg)."""
    gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    n = cfg.size
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    # background: a smooth, wrapping colour field (whole periods over the world) + faint fine grain
    img = torch.empty(3, n, n)
    for c in range(3):
        field = torch.zeros(n, n)
        for _ in range(3):
            ky, kx = torch.randint(-3, 4, (2,), generator=gen).tolist()
            phase = float(torch.rand((), generator=gen)) * 2 * math.pi
            field += torch.cos(2 * math.pi * (ky * yy + kx * xx) / n + phase)
        img[c] = 0.35 + 0.12 * field / 3
    grain = (torch.rand(n, n, generator=gen) - 0.5) * 0.08
    img += grain[None]
    for _ in range(cfg.num_shapes):
        shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=gen))]
        fill = FILLS[int(torch.randint(len(FILLS), (), generator=gen))]
        cy, cx = (torch.rand(2, generator=gen) * n).tolist()
        r = float(torch.randint(cfg.min_radius, cfg.max_radius + 1, (), generator=gen))
        # wrapped offsets from the centre, so shapes cross the world's edges seamlessly
        dy = torch.remainder(yy - cy + n / 2, n) - n / 2
        dx = torch.remainder(xx - cx + n / 2, n) - n / 2
        if shape == "disc":
            mask = dy**2 + dx**2 <= r**2
        elif shape == "box":
            ry = r * (0.5 + 0.5 * float(torch.rand((), generator=gen)))
            mask = (dy.abs() <= ry) & (dx.abs() <= r)
        elif shape == "diamond":
            mask = dy.abs() + dx.abs() <= r
        else:
            d2 = dy**2 + dx**2
            mask = (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
        tex = _fill(fill, yy, xx, gen)
        col_a, col_b = _palette_colour(gen), _palette_colour(gen) * 0.35
        colour = col_a[:, None, None] * tex + col_b[:, None, None] * (1 - tex)  # (3, n, n)
        img = torch.where(mask[None], colour, img)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def views(world: torch.Tensor, poses: torch.Tensor, view: int) -> torch.Tensor:
    """Camera views at integer pixel poses.

    Args:
        world: [3, S, S] world image.
        poses: [N, 2] int64 (y, x) of each view's top-left corner; taken modulo S (the world wraps).
        view: viewport size in pixels.
    Returns:
        [N, 3, view, view] float32.
    """
    size = world.shape[-1]
    offs = torch.arange(view)
    rows = torch.remainder(poses[:, 0:1] + offs[None], size)  # (N, view)
    cols = torch.remainder(poses[:, 1:2] + offs[None], size)  # (N, view)
    # world[:, rows[n][:, None], cols[n][None, :]] for every n: (3, N, view, view) -> (N, 3, view, view)
    out = world[:, rows[:, :, None], cols[:, None, :]]
    return out.permute(1, 0, 2, 3).contiguous()
