"""MP4 output through PyAV (its wheels ship FFmpeg with libx264: nothing is downloaded at run time).

Files are written under a temporary name beside the target and committed on a clean close (fsync,
rename, fsync of the directory: workers.durable), so a reader never sees a half-written video, not
even after a power loss, and a failed run leaves nothing behind. :meth:`Mp4Writer.finish` stops
short of the commit for a caller that hashes the file first and commits it under another name.

Two encodings:

- default: H.264 (``libx264``) ``yuv420p`` at constant rate factor ``crf`` (0 is lossless *in
  YUV*: the RGB -> YUV 4:2:0 conversion before it still rounds, so decoded frames differ from the
  input by a few levels; two encodes of the same frames decode equal). Frame sizes must be even.
- ``lossless=True``: RGB kept exactly (``read_mp4`` gives back the uint8 input bit for bit, any
  frame size): ``libx264rgb`` at qp 0 (``rgb24``; H.264 High 4:4:4 Predictive, stored as GBR
  planes), or, where the bundled FFmpeg lacks it, ``png`` frames (``rgb24``), also in mp4.

:func:`remux_mp4` joins mp4 files that share codec parameters by copying their packets (no
decode, no encode), so the joined file decodes to exactly the frames of its parts.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch

from workers.durable import commit_file, temp_path

# lossless RGB encoders in order of preference, each with its pix_fmt and options (all fit in mp4)
_LOSSLESS = (
    ("libx264rgb", "rgb24", {"qp": "0", "preset": "veryfast"}),
    ("png", "rgb24", {}),
)


def lossless_codec() -> tuple[str, str, dict[str, str]]:
    """(codec, pix_fmt, options) of the lossless RGB encoding this PyAV build can write."""
    for name, pix_fmt, options in _LOSSLESS:
        if name in av.codecs_available:
            return name, pix_fmt, dict(options)
    raise RuntimeError(f"PyAV's FFmpeg has none of the lossless RGB encoders {[c for c, _, _ in _LOSSLESS]}")


class Mp4Writer:
    """Append uint8 RGB frames; ``close()`` commits the file, ``abort()`` discards it.

    Args:
        path: final file name.
        fps: frames per second.
        upscale: integer nearest-neighbour upscale (tiny frames are 32x32; players need more).
        crf: x264 constant rate factor (lower is better quality; 0 is lossless in YUV); unused
            with ``lossless``.
        lossless: encode RGB losslessly (see the module docstring): decoded frames equal the input.
    """

    def __init__(self, path: str | os.PathLike, fps: int, upscale: int = 1, crf: int = 18, lossless: bool = False):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}.mp4")
        self.fps, self.upscale, self.crf, self.lossless = fps, upscale, crf, lossless
        self._container = None
        self._stream = None
        self.frames_written = 0

    def _open(self, height: int, width: int) -> None:
        if self.lossless:
            codec, pix_fmt, options = lossless_codec()
        else:
            codec, pix_fmt, options = "libx264", "yuv420p", {"crf": str(self.crf), "preset": "veryfast"}
        self._container = av.open(str(self.tmp), mode="w")
        self._stream = self._container.add_stream(codec, rate=self.fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = pix_fmt
        self._stream.options = options

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """frames: [N, H, W, 3] uint8 RGB."""
        arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
        if self.upscale > 1:
            arr = arr.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        if self._container is None:
            h, w = arr.shape[1], arr.shape[2]
            if not self.lossless and (h % 2 or w % 2):
                raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
            self._open(h, w)
        for img in arr:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                self._container.mux(packet)
            self.frames_written += 1

    def finish(self) -> Path:
        """Flush the encoder and close the file; returns the finished temp file, not yet committed.

        The caller commits it (workers.durable.commit_file) or discards it with :meth:`abort`.
        """
        if self._container is None:
            raise ValueError("no frames were written")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self.tmp

    def close(self) -> Path:
        """Finish the video and commit it durably at ``path`` (the temp file is removed if that fails)."""
        try:
            tmp = self.finish()
        except BaseException:
            self.abort()
            raise
        commit_file(tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):  # the file is discarded anyway
                self._container.close()
            self._container = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame: [N, H, W, 3] uint8."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class VideoParams(NamedTuple):
    """What must agree between mp4 files for their packets to join into one valid stream."""

    codec: str
    width: int
    height: int
    pix_fmt: str | None
    profile: str | None
    time_base: Fraction
    rate: Fraction | None
    extradata: bytes  # SPS/PPS (H.264 avcC): equal bytes mean equal decoder set-up


class ParamsDiffer(ValueError):
    """The files of a join do not share codec parameters (or cannot be joined packet by packet)."""


def video_params(path: str | os.PathLike) -> VideoParams:
    """The codec parameters of an mp4 file's first video stream."""
    with av.open(str(path)) as c:
        return _params_of(c.streams.video[0])


def _params_of(s) -> VideoParams:
    cc = s.codec_context
    return VideoParams(
        cc.name, cc.width, cc.height, cc.pix_fmt, cc.profile, s.time_base,
        s.average_rate or s.guessed_rate, bytes(cc.extradata or b""),
    )  # fmt: skip


def remux_mp4(paths: list[Path], out: str | os.PathLike) -> int:
    """Write ``out`` (mp4) as the videos of ``paths`` one after the other, without re-encoding.

    Every packet of every file is copied with its timestamps shifted by the duration of the files
    before it, so ``read_mp4(out)`` equals the concatenation of ``read_mp4(p)``. The file is
    committed durably and appears under ``out`` only when complete.

    Returns:
        the number of packets (= frames) written.

    Raises:
        ParamsDiffer: the files differ in codec parameters (nothing is written); re-encode instead.
    """
    if not paths:
        raise ValueError("nothing to join")
    params = [video_params(p) for p in paths]
    differ = sorted({f for a in params[1:] for f in VideoParams._fields if getattr(a, f) != getattr(params[0], f)})
    if differ:
        raise ParamsDiffer(f"segments differ in {', '.join(differ)}")
    out = Path(out)
    tmp = temp_path(out)
    try:
        n = _remux(paths, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, out)  # removes tmp itself if the commit fails
    return n


def _remux(paths: list[Path], tmp: Path) -> int:
    n, offset, last_dts = 0, 0, None
    with av.open(str(tmp), mode="w", format="mp4") as dst:
        ostream = None
        for path in paths:
            with av.open(str(path)) as src:
                istream = src.streams.video[0]
                if ostream is None:
                    add = getattr(dst, "add_stream_from_template", None)  # PyAV >= 14
                    ostream = add(istream) if add is not None else dst.add_stream(template=istream)
                packets = [p for p in src.demux(istream) if p.dts is not None]  # drop the flush packet
                if not packets or not packets[0].is_keyframe:
                    raise ParamsDiffer(f"{path}: does not start with a keyframe")
                frame = _frame_duration(istream)
                start = min(p.pts for p in packets)
                end = max(p.pts + (p.duration or frame) for p in packets)
                for p in packets:
                    p.pts, p.dts = p.pts - start + offset, p.dts - start + offset
                    if last_dts is not None and p.dts <= last_dts:
                        raise ParamsDiffer(f"{path}: decode timestamps would not increase across the join")
                    last_dts = p.dts
                    p.stream = ostream
                    dst.mux(p)
                    n += 1
                offset += end - start
    return n


def _frame_duration(stream) -> int:
    """One frame's duration in the stream's time base (for packets that carry none)."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ParamsDiffer("frame rate unknown")
    return max(1, round(1 / (rate * stream.time_base)))
