"""Latent segments: a stream's clean latents saved as safetensors where no decoder makes video.

A latent segment file holds one tensor ``latents`` ``[F_total, C, H, W]`` float32 (its chunks'
latents concatenated along frames, in chunk order) and the string metadata ``first_chunk``,
``last_chunk`` and ``frames_per_chunk``, so ``F_total == (last_chunk - first_chunk + 1) *
frames_per_chunk``. :class:`LatentSegmentWriter` mirrors :class:`workers.video.Mp4Writer`: chunks
are held in memory (a segment is at most ``segment_chunks`` chunks) and the file is committed on
``close()`` through workers.durable (hidden temp file, fsync, rename, fsync of the directory);
:meth:`LatentSegmentWriter.to_bytes` gives the file's bytes for a caller that commits (and hashes)
them itself. :func:`join_latent_segments` writes the export of many segments while holding one
segment at a time, and commits it the same durable way.

The same file format serves as the *latent sidecar* of a decoded (mp4) stream that keeps its
latents (workers.output, ``keep_latents``): ``DIR/streams/<id>/latents/<first:08d>-<last:08d>.safetensors``
beside ``segments/<first:08d>-<last:08d>.mp4``. :func:`read_latents` returns a chunk range's latent
frames from either kind of file (a resumed stream re-decodes its last few latent frames from them).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from workers.durable import commit_file, temp_path, write_atomic

TENSOR = "latents"  # the one tensor of a latent segment (and of an export)
SIDECAR_DIR = "latents"  # a decoded stream's latent sidecars, beside its "segments" directory
LATENT_FILE_RE = re.compile(r"^(\d{8})-(\d{8})\.safetensors$")


class LatentSegmentWriter:
    """Append ``[F, C, H, W]`` chunk latents; ``close()`` commits the file, ``abort()`` discards it.

    Args:
        path: final file name (``*.safetensors``).
        first_chunk: chunk index of the first chunk written.
    """

    def __init__(self, path: str | os.PathLike, first_chunk: int):
        self.path = Path(path)
        self.first_chunk = first_chunk
        self._chunks: list[torch.Tensor] = []  # each [F, C, H, W] float32, CPU (copies: the caller may reuse)

    def write(self, latents: torch.Tensor) -> None:
        """latents: one chunk's ``[F, C, H, W]`` clean latents (any float dtype and device)."""
        if latents.ndim != 4 or latents.shape[0] < 1 or not latents.is_floating_point():
            raise ValueError(f"latents must be float [F, C, H, W], F >= 1, got {latents.dtype} {tuple(latents.shape)}")
        if self._chunks and latents.shape != self._chunks[0].shape:
            first = tuple(self._chunks[0].shape)
            raise ValueError(f"chunk latents {tuple(latents.shape)} differ from the segment's first chunk's {first}")
        self._chunks.append(latents.detach().to("cpu", torch.float32, copy=True).contiguous())

    @property
    def chunks_written(self) -> int:
        return len(self._chunks)

    def to_bytes(self) -> bytes:
        """The segment file's bytes (safetensors), built in memory: nothing touches the disk."""
        if not self._chunks:
            raise ValueError("no chunks were written")
        meta = {
            "first_chunk": str(self.first_chunk),
            "last_chunk": str(self.first_chunk + len(self._chunks) - 1),
            "frames_per_chunk": str(self._chunks[0].shape[0]),
        }
        return st_save({TENSOR: torch.cat(self._chunks)}, metadata=meta)  # N x [F, C, H, W] -> [N*F, C, H, W]

    def close(self) -> Path:
        """Commit the segment at ``path`` durably (a failed write leaves no temp file behind)."""
        write_atomic(self.path, self.to_bytes())
        self._chunks = []
        return self.path

    def abort(self) -> None:
        self._chunks = []  # nothing is on disk before close()


@dataclass(frozen=True)
class LatentSegmentInfo:
    """What a latent segment's header says (read without loading its tensor)."""

    first_chunk: int
    last_chunk: int
    frames_per_chunk: int
    shape: tuple[int, int, int, int]  # [F_total, C, H, W]


def read_segment_info(path: str | os.PathLike) -> LatentSegmentInfo:
    """Header of a latent segment file.

    Raises:
        ValueError: the file is not a latent segment (wrong tensor, dtype, metadata, or frame count).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            if keys != [TENSOR]:
                raise ValueError(f"expected one tensor {TENSOR!r}, found {keys}")
            sl = f.get_slice(TENSOR)
            dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
        info = LatentSegmentInfo(
            int(meta["first_chunk"]), int(meta["last_chunk"]), int(meta["frames_per_chunk"]), shape
        )
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path}: not a latent segment: {e}") from None
    if dtype != "F32" or len(shape) != 4:
        raise ValueError(f"{path}: {TENSOR} is {dtype} {shape}, expected F32 [F, C, H, W]")
    if shape[0] != (info.last_chunk - info.first_chunk + 1) * info.frames_per_chunk:
        raise ValueError(f"{path}: {shape[0]} frames do not match chunks {info.first_chunk}..{info.last_chunk}")
    return info


def read_latent_segment(path: str | os.PathLike) -> torch.Tensor:
    """The ``[F_total, C, H, W]`` float32 latents of one segment file."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(TENSOR)


def join_latent_segments(paths: list[Path], out: str | os.PathLike, metadata: dict[str, str]) -> tuple[int, ...]:
    """Write ``out`` (safetensors, tensor ``latents``) as the segments' latents joined in the given order.

    The safetensors header is written first from the segments' headers, then each segment's bytes
    are appended, so only one segment is in memory at a time; the file appears under ``out`` only
    when complete. All segments must share [C, H, W] (check with :func:`read_segment_info` first).

    Returns:
        the joined shape ``(F, C, H, W)``.
    """
    if sys.byteorder != "little":  # safetensors stores little-endian; raw tensor bytes are native
        raise RuntimeError("join_latent_segments needs a little-endian machine")
    infos = [read_segment_info(p) for p in paths]
    chw = {i.shape[1:] for i in infos}
    if len(chw) != 1:
        raise ValueError(f"segments disagree on [C, H, W]: {sorted(chw)}")
    shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])
    nbytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]
    header = {"__metadata__": metadata, TENSOR: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the reference writer pads the header to 8 bytes with spaces
    out = Path(out)
    tmp = temp_path(out)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for p, info in zip(paths, infos):
                t = read_latent_segment(p)
                if tuple(t.shape) != info.shape:
                    raise ValueError(f"{p}: changed while exporting")
                f.write(t.contiguous().numpy().tobytes())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, out)  # removes tmp itself if the commit fails
    return shape


def latent_files(stream_dir: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """(first, last, path) of a stream's committed latent files: sidecars and latent-only segments."""
    found = []
    for sub in (SIDECAR_DIR, "segments"):
        d = Path(stream_dir) / sub
        if d.is_dir():
            found += [(int(m[1]), int(m[2]), d / m[0]) for p in d.iterdir() if (m := LATENT_FILE_RE.match(p.name))]
    return sorted(found)


def read_latents(stream_dir: str | os.PathLike, first_chunk: int, last_chunk: int) -> torch.Tensor:
    """The ``[F, C, H, W]`` float32 latent frames of chunks ``first_chunk..last_chunk`` of one stream.

    Read from the stream's latent sidecars (``latents/``) or latent-only segments (``segments/``),
    as many files as the range spans, each only for the frames inside the range.

    Raises:
        ValueError: the range is empty or a chunk of it is in no latent file (or a file is not one).
    """
    if not 0 <= first_chunk <= last_chunk:
        raise ValueError(f"bad chunk range {first_chunk}..{last_chunk}")
    parts, chw, nxt = [], None, first_chunk
    for first, last, path in latent_files(stream_dir):
        if last < nxt or first > nxt:
            continue  # ends before the next chunk wanted, or starts past it (a gap: reported below)
        info = read_segment_info(path)
        if (info.first_chunk, info.last_chunk) != (first, last):
            raise ValueError(
                f"{path}: holds chunks {info.first_chunk}..{info.last_chunk}, its name says {first}..{last}"
            )
        if chw is not None and info.shape[1:] != chw:
            raise ValueError(f"{path}: latents {info.shape[1:]} differ from the range's {chw}")
        chw, fpc, end = info.shape[1:], info.frames_per_chunk, min(last, last_chunk)
        with safe_open(str(path), framework="pt") as f:
            parts.append(f.get_slice(TENSOR)[(nxt - first) * fpc : (end - first + 1) * fpc])
        nxt = end + 1
        if nxt > last_chunk:
            return torch.cat(parts)
    raise ValueError(f"{stream_dir}: no latent file holds chunk {nxt} (range {first_chunk}..{last_chunk})")
