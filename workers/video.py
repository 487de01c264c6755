"""MP4 output through PyAV (its wheels ship FFmpeg with libx264: nothing is downloaded at run time).

Files are written under a temporary name beside the target and committed on a clean close (fsync,
rename, fsync of the directory: workers.durable), so a reader never sees a half-written video, not
even after a power loss, and a failed run leaves nothing behind. :meth:`Mp4Writer.finish` stops
short of the commit for a caller that hashes the file first and commits it under another name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import av
import numpy as np
import torch

from workers.durable import commit_file


class Mp4Writer:
    """Append uint8 RGB frames; ``close()`` commits the file, ``abort()`` discards it.

    Args:
        path: final file name.
        fps: frames per second.
        upscale: integer nearest-neighbour upscale (tiny frames are 32x32; players need more).
        crf: x264 constant rate factor (lower is better quality; 0 is lossless).
    """

    def __init__(self, path: str | os.PathLike, fps: int, upscale: int = 1, crf: int = 18):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}.mp4")
        self.fps, self.upscale, self.crf = fps, upscale, crf
        self._container = None
        self._stream = None
        self.frames_written = 0

    def _open(self, height: int, width: int) -> None:
        self._container = av.open(str(self.tmp), mode="w")
        self._stream = self._container.add_stream("libx264", rate=self.fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """frames: [N, H, W, 3] uint8 RGB."""
        arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
        if self.upscale > 1:
            arr = arr.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        if self._container is None:
            h, w = arr.shape[1], arr.shape[2]
            if h % 2 or w % 2:
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
