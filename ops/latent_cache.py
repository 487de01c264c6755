"""Fixed-capacity KV cache of one stream, for every layer: sink | memory | local-window ring.

Slots are whole latent frames. The cache is allocated once and never grows:

    slot frames: [0, sink)                 sink: the stream's first frames, never evicted
                 [sink, sink + memory)     memory: filled by retrieval (LongLive-RAG / OmniMem)
                 [sink + memory, total)    local window: a ring buffer, one chunk appended at a time

Per token and layer it stores one row of ``width`` values:
    mla: ``[c_kv (d_c) | k_rope (d_r)]``                   (VideoMLA low-rank latent + decoupled RoPE key)
    mha: ``[k (H*D) | v (H*D)]``                           (the baseline)
Rotary keys are stored *unrotated* together with each frame's absolute index; positions are
applied at read time by the position policy, so ``relative`` ids that shift every chunk need no
rewrite of the cache. Unused slots hold NaN so that any read that forgets the valid mask fails loudly.

Storage dtype is fp32, bf16, fp16 or fp8 (e4m3) with an fp32 scale per token or per frame, one scale
for each of the two parts of the row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from ops.quant import FP8_DTYPE, dequantize_fp8, quantize_fp8

CacheKind = Literal["mha", "mla"]
StorageDtype = Literal["fp32", "bf16", "fp16", "fp8"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": FP8_DTYPE,
}
_SCALE_BYTES = 4  # fp32 scale


@dataclass(frozen=True)
class CacheLayout:
    kind: CacheKind  # "mla": latent + shared rope key per token; "mha": per-head K and V
    num_layers: int  # one row per token per transformer layer
    tokens_per_frame: int  # tokens of one latent frame (1560 for Wan2.1 at 480x832)
    sink_frames: int = 1  # first frames of the stream, kept forever
    memory_frames: int = 0  # slots filled by retrieval; 0 disables memory
    window_frames: int = 6  # local window ring, must hold at least one chunk
    num_heads: int = 1  # mha: heads of K and V
    head_dim: int = 0  # mha: width of one head
    latent_dim: int = 0  # mla: d_c, width of the shared latent c_kv
    rope_dim: int = 0  # mla: d_r, width of the shared decoupled rotary key
    dtype: StorageDtype = "fp32"  # storage dtype of the rows
    fp8_scale: Literal["token", "frame"] = "token"  # fp8 only: one scale per token or per frame

    def __post_init__(self) -> None:
        if self.kind not in ("mha", "mla"):
            raise ValueError(f"{self.kind=} must be 'mha' or 'mla'")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"{self.dtype=} must be one of {sorted(TORCH_DTYPES)}")
        if self.fp8_scale not in ("token", "frame"):
            raise ValueError(f"{self.fp8_scale=} must be 'token' or 'frame'")
        for name in ("num_layers", "tokens_per_frame", "window_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.sink_frames < 0 or self.memory_frames < 0:
            raise ValueError(f"{self.sink_frames=} and {self.memory_frames=} must be >= 0")
        if self.kind == "mha" and (self.num_heads < 1 or self.head_dim < 1):
            raise ValueError(f"mha cache needs {self.num_heads=} >= 1 and {self.head_dim=} >= 1")
        if self.kind == "mla" and (self.latent_dim < 1 or self.rope_dim < 1):
            raise ValueError(f"mla cache needs {self.latent_dim=} >= 1 and {self.rope_dim=} >= 1")

    @property
    def slot_frames(self) -> int:
        return self.sink_frames + self.memory_frames + self.window_frames

    @property
    def parts(self) -> tuple[int, int]:
        """Widths of the two parts of a row: (c_kv, k_rope) for mla, (k, v) for mha."""
        if self.kind == "mla":
            return self.latent_dim, self.rope_dim
        return self.num_heads * self.head_dim, self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        return sum(self.parts)

    def bytes_per_token_per_layer(self) -> float:
        """Stored bytes of one token in one layer, scales included."""
        elem = TORCH_DTYPES[self.dtype].itemsize
        row = self.width * elem
        if self.dtype == "fp8":
            per = 1 if self.fp8_scale == "token" else self.tokens_per_frame
            row += 2 * _SCALE_BYTES / per
        return float(row)

    def bytes_per_token(self) -> float:
        """Stored bytes of one token across all layers."""
        return self.bytes_per_token_per_layer() * self.num_layers

    def capacity_bytes(self) -> int:
        """Bytes of the preallocated buffers of one stream (what :meth:`LatentKVCache.nbytes` reports)."""
        tokens = self.slot_frames * self.tokens_per_frame
        data = self.num_layers * tokens * self.width * TORCH_DTYPES[self.dtype].itemsize
        scale = 0
        if self.dtype == "fp8":
            groups = tokens if self.fp8_scale == "token" else self.slot_frames
            scale = self.num_layers * groups * 2 * _SCALE_BYTES
        return data + scale + self.slot_frames * 8  # + int64 frame index per slot


@dataclass
class AppendPlan:
    """Where the frames of one chunk go; computed before the re-cache pass, applied by commit()."""

    frames: list[int]  # absolute frame indices being appended
    slots: list[int]  # slot frame of each
    evicted: list[int] = field(default_factory=list)  # absolute indices of frames overwritten
    evicted_slots: list[int] = field(default_factory=list)  # the slot each evicted frame held


class LatentKVCache:
    """One stream's cache for all layers. See the module docstring for the layout."""

    def __init__(self, layout: CacheLayout, device: torch.device | str = "cpu"):
        self.layout = layout
        self.device = torch.device(device)
        lay = layout
        tokens = lay.slot_frames * lay.tokens_per_frame
        self.data = torch.full(
            (lay.num_layers, tokens, lay.width), float("nan"), dtype=TORCH_DTYPES[lay.dtype], device=self.device
        )
        self.scale: torch.Tensor | None = None
        if lay.dtype == "fp8":
            groups = tokens if lay.fp8_scale == "token" else lay.slot_frames
            self.scale = torch.ones((lay.num_layers, groups, 2), dtype=torch.float32, device=self.device)
        self.frame_index = torch.full((lay.slot_frames,), -1, dtype=torch.int64)  # -1: empty slot
        self.window_written = 0  # frames ever written into the window ring
        self.memory_written = 0  # frames ever pushed into the memory region as a ring (push_memory)
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None  # memo of valid slot/token indices

    # ---- bookkeeping -------------------------------------------------------------------------
    def nbytes(self) -> int:
        n = self.data.nbytes + self.frame_index.nbytes
        return n + (self.scale.nbytes if self.scale is not None else 0)

    @property
    def window_start(self) -> int:
        return self.layout.sink_frames + self.layout.memory_frames

    def slot_kind(self, slot: int) -> str:
        if slot < self.layout.sink_frames:
            return "sink"
        return "memory" if slot < self.window_start else "local"

    def plan_append(self, frames: list[int]) -> AppendPlan:
        """Choose slots for consecutive new frames: sink slots first, then the window ring.

        Raises:
            ValueError: if the chunk is larger than the window (it would overwrite itself).
        """
        lay = self.layout
        ring = [f for f in frames if f >= lay.sink_frames or self.frame_index[f] >= 0]
        if len(ring) > lay.window_frames:
            raise ValueError(f"chunk of {len(frames)} frames does not fit {lay.window_frames=}")
        plan = AppendPlan(frames=list(frames), slots=[])
        pos = self.window_written
        for f in frames:
            if f < lay.sink_frames and self.frame_index[f] < 0:
                plan.slots.append(f)
                continue
            slot = self.window_start + pos % lay.window_frames
            old = int(self.frame_index[slot])
            if old >= 0:
                plan.evicted.append(old)
                plan.evicted_slots.append(slot)
            plan.slots.append(slot)
            pos += 1
        return plan

    def commit(self, plan: AppendPlan) -> list[int]:
        """Record the frames of a plan whose rows every layer has written. Returns evicted frames."""
        for f, s in zip(plan.frames, plan.slots):
            self.frame_index[s] = f
            if s >= self.window_start:
                self.window_written += 1
        self._gather = None
        return plan.evicted

    def assign_memory(self, frames: list[int]) -> list[int]:
        """Mark memory slots as holding the given absolute frames (rows written by write_slots).

        Returns the slot of each frame; the remaining memory slots become empty.
        """
        lay = self.layout
        if len(frames) > lay.memory_frames:
            raise ValueError(f"{len(frames)} memory frames do not fit {lay.memory_frames=}")
        slots = list(range(lay.sink_frames, lay.sink_frames + len(frames)))
        self.frame_index[lay.sink_frames : self.window_start] = -1
        for f, s in zip(frames, slots):
            self.frame_index[s] = f
        self._gather = None
        return slots

    def push_memory(self, frames: list[int], rows: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Append whole frames (rows from :meth:`export_slots`) to the memory region used as a ring.

        The far-history ring of sparse memory: frames evicted from the local window are pushed here,
        overwriting the oldest pushed frame once the region is full.
        """
        lay = self.layout
        if lay.memory_frames == 0:
            raise ValueError("this cache has no memory slots")
        slots = [lay.sink_frames + (self.memory_written + i) % lay.memory_frames for i in range(len(frames))]
        if len(set(slots)) != len(slots):
            raise ValueError(f"{len(frames)} frames do not fit {lay.memory_frames=}")
        self.import_slots(slots, rows, scale)
        for f, slot in zip(frames, slots):
            self.frame_index[slot] = f
        self.memory_written += len(frames)
        self._gather = None

    def kind_counts(self, slots: torch.Tensor | None = None) -> dict[str, int]:
        """How many of the (valid) slots are sink, memory and local frames."""
        slots = self.valid_slots() if slots is None else slots
        out = {"sink": 0, "memory": 0, "local": 0}
        for s in slots.tolist():
            out[self.slot_kind(s)] += 1
        return out

    # ---- data --------------------------------------------------------------------------------
    def write_slots(self, layer: int, slots: list[int], rows: torch.Tensor) -> None:
        """Store rows for whole slot frames of one layer.

        Args:
            rows: [len(slots) * tokens_per_frame, width], frame-major in the order of ``slots``.
        """
        lay = self.layout
        t_f = lay.tokens_per_frame
        if tuple(rows.shape) != (len(slots) * t_f, lay.width):
            raise ValueError(f"rows {tuple(rows.shape)} != ({len(slots)} * {t_f}, {lay.width})")
        # (F*T, W) -> (F, T, W)
        rows = rows.reshape(len(slots), t_f, lay.width)
        slot_t = torch.tensor(slots, dtype=torch.int64, device=self.device)
        view = self.data[layer].view(lay.slot_frames, t_f, lay.width)
        if lay.dtype != "fp8":
            view[slot_t] = rows.to(self.data.dtype)
            return
        d0 = lay.parts[0]
        group = (-1,) if lay.fp8_scale == "token" else (-2, -1)
        q0, s0 = quantize_fp8(rows[..., :d0], group)  # scale (F, T, 1) or (F, 1, 1)
        q1, s1 = quantize_fp8(rows[..., d0:], group)
        view[slot_t] = torch.cat([q0, q1], dim=-1)
        scale = torch.cat([s0, s1], dim=-1)  # (F, T or 1, 2)
        if lay.fp8_scale == "token":
            self.scale[layer].view(lay.slot_frames, t_f, 2)[slot_t] = scale
        else:
            self.scale[layer][slot_t] = scale[:, 0, :]

    def export_slots(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw stored rows (and fp8 scales) of whole slot frames, every layer: a copy to re-import later.

        Returns:
            rows: [L, len(slots), T_f, width] in the storage dtype; scale: [L, len(slots), T_f or 1, 2] or None.
        """
        lay = self.layout
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        # (L, N, W) -> (L, slot_frames, T_f, W)
        rows = self.data.view(lay.num_layers, lay.slot_frames, lay.tokens_per_frame, lay.width)[:, idx].clone()
        scale = None
        if self.scale is not None:
            per = lay.tokens_per_frame if lay.fp8_scale == "token" else 1
            scale = self.scale.view(lay.num_layers, lay.slot_frames, per, 2)[:, idx].clone()
        return rows, scale

    def import_slots(self, slots: list[int], rows: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Write back what :meth:`export_slots` returned, into (possibly other) slots."""
        lay = self.layout
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.data.view(lay.num_layers, lay.slot_frames, lay.tokens_per_frame, lay.width)[:, idx] = rows
        if self.scale is not None:
            per = lay.tokens_per_frame if lay.fp8_scale == "token" else 1
            self.scale.view(lay.num_layers, lay.slot_frames, per, 2)[:, idx] = scale

    def valid_slots(self) -> torch.Tensor:
        """Slot frames holding data, in slot order: [n] int64."""
        return torch.nonzero(self.frame_index >= 0).flatten()

    def slots_of(self, kind: str) -> torch.Tensor:
        """Valid slot frames of one kind ("sink", "memory" or "local"), in slot order."""
        return torch.tensor([s for s in self.valid_slots().tolist() if self.slot_kind(s) == kind], dtype=torch.int64)

    def _token_index(self, slots: torch.Tensor) -> torch.Tensor:
        t_f = self.layout.tokens_per_frame
        # (n, 1) * T + (1, T) -> (n*T,)
        return (slots[:, None] * t_f + torch.arange(t_f)[None, :]).flatten().to(self.device)

    def _gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gather is None:
            slots = self.valid_slots()
            self._gather = (slots, self._token_index(slots))
        return self._gather

    def read(
        self, layer: int, dtype: torch.dtype = torch.float32, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the valid slots (or of the given slots) of one layer, dequantized.

        Args:
            slots: optional [n] int64 slot frames to read instead of every valid one.
        Returns:
            rows: [n * tokens_per_frame, width] in ``dtype``, in slot order;
            slots: [n] int64 slot frames they come from.
        """
        if slots is None:
            slots, tok = self._gather_index()
        else:
            tok = self._token_index(slots)
        rows = self.data[layer].index_select(0, tok)
        if self.layout.dtype != "fp8":
            return rows.to(dtype), slots
        lay = self.layout
        if lay.fp8_scale == "token":
            scale = self.scale[layer].index_select(0, tok)  # (N, 2)
        else:
            scale = self.scale[layer].index_select(0, slots.to(self.device)).repeat_interleave(lay.tokens_per_frame, 0)
        d0 = lay.parts[0]
        part0 = dequantize_fp8(rows[:, :d0], scale[:, 0:1], dtype)
        part1 = dequantize_fp8(rows[:, d0:], scale[:, 1:2], dtype)
        return torch.cat([part0, part1], dim=-1), slots

    # ---- persistence -------------------------------------------------------------------------
    def state_tensors(self, prefix: str = "cache.") -> dict[str, torch.Tensor]:
        out = {prefix + "data": self.data, prefix + "frame_index": self.frame_index}
        if self.scale is not None:
            out[prefix + "scale"] = self.scale
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def state_meta(self) -> dict:
        return {
            "layout": asdict(self.layout),
            "window_written": self.window_written,
            "memory_written": self.memory_written,
        }

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], meta: dict, device: torch.device | str = "cpu", prefix: str = "cache."
    ) -> LatentKVCache:
        """Rebuild a cache saved by state_tensors()/state_meta(). Raises ValueError on a mismatch."""
        cache = cls(CacheLayout(**meta["layout"]), device)
        for name, dst in (("data", cache.data), ("frame_index", cache.frame_index), ("scale", cache.scale)):
            if dst is None:
                continue
            src = tensors.get(prefix + name)
            if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"saved cache tensor {name!r} is missing or does not match the layout")
            dst.copy_(src)
        cache.window_written = int(meta["window_written"])
        cache.memory_written = int(meta.get("memory_written", 0))
        return cache
