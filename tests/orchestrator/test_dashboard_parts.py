"""Dashboard parts on their own: the PNG encoder, the token file, the port fallback, frames/s."""

import os
import socket
import stat

import av
import numpy as np
import pytest
import torch

from orchestrator.dashboard.server import TOKEN_FILE, _bind, ensure_token
from orchestrator.telemetry import StreamTelemetry
from workers.messages import StreamProgress
from workers.preview import encode_png, preview_png


@pytest.mark.parametrize("h, w", [(1, 1), (7, 5), (32, 32), (13, 300)])
def test_png_decodes_to_the_same_pixels(tmp_path, h, w):
    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(rgb))
    with av.open(str(path)) as c:  # an independent decoder (FFmpeg's)
        got = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(got, rgb)


def test_preview_is_the_last_frame_strided_to_fit():
    frames = torch.randint(0, 256, (3, 600, 300, 3), dtype=torch.uint8)
    png = preview_png(frames, max_side=256)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (h, w) == (200, 100)  # stride 3
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2, 3), np.float32))


def test_token_is_private_and_kept_across_restarts(tmp_path):
    t = ensure_token(tmp_path)
    assert len(t) >= 32 and stat.S_IMODE(os.stat(tmp_path / TOKEN_FILE).st_mode) == 0o600
    assert ensure_token(tmp_path) == t  # a restarted orchestrator keeps the token
    os.chmod(tmp_path / TOKEN_FILE, 0o644)
    assert ensure_token(tmp_path) == t and stat.S_IMODE(os.stat(tmp_path / TOKEN_FILE).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [TOKEN_FILE]  # no temporary file left


def test_a_taken_port_falls_back_to_a_free_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        sock, moved = _bind("127.0.0.1", port)
        try:
            assert moved and sock.getsockname()[1] != port
        finally:
            sock.close()
    sock, moved = _bind("127.0.0.1", 0)
    sock.close()
    assert not moved


def test_fps_counts_recent_frames_only():
    tel = StreamTelemetry()
    for i in range(11):  # 3 frames every 0.5 s for 5 s: 6 frames/s
        tel.on_progress(StreamProgress("s", i + 1, i + 1, None, "running", frames=3), 0.1, now=100.0 + 0.5 * i)
    assert tel.fps(now=105.0) == pytest.approx(6.0)
    assert tel.fps(now=200.0) == 0.0  # nothing lately
    tel.on_progress(StreamProgress("s", 12, 12, 12, "running", frames=3, preview=b"png"), 0.1, now=201.0)
    assert tel.latest_preview() == 11 and tel.checkpoint == 12 and tel.log[-1]["event"] == "checkpoint.saved"
