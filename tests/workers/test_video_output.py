"""Lossless RGB mp4 (workers.video), latent sidecars of decoded streams (workers.output,
workers.latent_segments.read_latents) and `longroll export` joining mp4 segments without re-encoding
(or their latent sidecars with --latents). Real files, real PyAV."""

import json
import os

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

from orchestrator.cli import main
from orchestrator.integrity import verify_stream_segments
from orchestrator.registry import RunSpec, StreamEntry
from workers import video
from workers.durable import file_sha256
from workers.latent_segments import read_latents
from workers.output import StreamOutput, read_manifest
from workers.types import Chunk, StreamSpec
from workers.video import Mp4Writer, ParamsDiffer, read_mp4, remux_mp4

F, C, H, W = 2, 4, 2, 3  # latent frames per chunk and latent shape
N = 3  # decoded frames per chunk
PX = 8  # decoded frame side (before the output's upscale)
RANGES = [(0, 1), (2, 3), (4, 4)]  # 5 chunks in segments of 2


def rand_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    f = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    f[0, 0, 0], f[-1, -1, -1] = (0, 255, 0), (255, 0, 255)  # both ends of the range, in every channel
    return f


def frames_of(i: int) -> torch.Tensor:
    """Chunk i's decoded frames: a gradient that moves a little each frame (x264 then uses B-frames)."""
    y, x = np.mgrid[0:PX, 0:PX]
    ts = range(i * N, (i + 1) * N)
    f = [np.stack([(16 * x + 5 * t) % 256, (16 * y + 3 * t) % 256, (8 * (x + y) + 7 * t) % 256], -1) for t in ts]
    return torch.from_numpy(np.stack(f).astype(np.uint8))


def latents_of(i: int, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(F, C, H, W, generator=torch.Generator().manual_seed(i)) + offset


def chunk(i: int, offset: float = 0.0, sid: str = "v") -> Chunk:
    return Chunk(sid, i, i * F, latents_of(i, offset), frames_of(i))


def write_stream(d, chunks: range, start: int | None = None, offset: float = 0.0, **kw) -> dict:
    kw = {"segment_chunks": 2, "target_chunks": 5, "upscale": 2, "keep_latents": True, **kw}
    out = StreamOutput(d, "v", fps=8, **kw)
    out.start_at(chunks.start if start is None else start)
    for i in chunks:
        out.write(chunk(i, offset))
    return out.write_manifest("done", None)


def names(d) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def rng_name(first: int, last: int, suffix: str) -> str:
    return f"{first:08d}-{last:08d}{suffix}"


def sidecar(path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents"), f.metadata()


def packets(path) -> list[tuple[bytes, bool]]:
    with av.open(str(path)) as c:
        return [(bytes(p), p.is_keyframe) for p in c.demux(video=0) if p.size]


# ---- lossless mp4 -------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(17, 23), (64, 64)])
def test_lossless_mp4_round_trips_uint8_frames_exactly(tmp_path, h, w):
    frames = rand_frames(6, h, w)
    with Mp4Writer(tmp_path / "a.mp4", fps=8, lossless=True) as wr:
        wr.write(frames[:2])
        wr.write(torch.from_numpy(frames[2:]))
    got = read_mp4(tmp_path / "a.mp4")
    assert got.dtype == np.uint8 and got.shape == frames.shape and np.array_equal(got, frames)
    if "libx264rgb" in av.codecs_available:
        with av.open(str(tmp_path / "a.mp4")) as c:
            cc = c.streams.video[0].codec_context
            assert (cc.name, cc.profile) == ("h264", "High 4:4:4 Predictive")


def test_lossless_mp4_with_upscale_and_the_png_fallback_are_exact(tmp_path, monkeypatch):
    frames = rand_frames(4, 5, 7, seed=1)
    with Mp4Writer(tmp_path / "a.mp4", fps=8, upscale=3, lossless=True) as wr:
        wr.write(frames)
    assert np.array_equal(read_mp4(tmp_path / "a.mp4"), frames.repeat(3, axis=1).repeat(3, axis=2))
    monkeypatch.setattr(video, "_LOSSLESS", video._LOSSLESS[1:])  # a PyAV build without libx264rgb
    assert video.lossless_codec()[0] == "png"
    with Mp4Writer(tmp_path / "p.mp4", fps=8, lossless=True) as wr:
        wr.write(frames)
    with av.open(str(tmp_path / "p.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "png"
    assert np.array_equal(read_mp4(tmp_path / "p.mp4"), frames)


def test_the_default_encoding_is_still_x264_yuv420p(tmp_path):
    frames = rand_frames(3, 16, 16)
    for name in ("a.mp4", "b.mp4"):
        with Mp4Writer(tmp_path / name, fps=8, crf=0) as wr:
            wr.write(frames)
    with av.open(str(tmp_path / "a.mp4")) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert np.array_equal(read_mp4(tmp_path / "a.mp4"), read_mp4(tmp_path / "b.mp4"))  # deterministic
    with pytest.raises(ValueError, match="even frame sizes"):
        Mp4Writer(tmp_path / "odd.mp4", fps=8).write(rand_frames(1, 17, 23))
    assert names(tmp_path) == ["a.mp4", "b.mp4"]


# ---- latent sidecars ----------------------------------------------------------------------------
def test_a_decoded_stream_with_keep_latents_writes_an_mp4_and_a_sidecar_per_range(tmp_path):
    m = write_stream(tmp_path, range(5))
    assert names(tmp_path / "segments") == [rng_name(a, b, ".mp4") for a, b in RANGES]
    assert names(tmp_path / "latents") == [rng_name(a, b, ".safetensors") for a, b in RANGES]
    assert m["output"] == "mp4" and (m["frames_per_chunk"], m["frames_done"]) == (N, 5 * N)
    for (a, b), e in zip(RANGES, m["segments"]):
        assert set(e) == {"first", "last", "file", "sha256", "bytes", "latents", "latents_sha256", "latents_bytes"}
        assert (e["first"], e["last"]) == (a, b)
        assert e["file"] == f"segments/{rng_name(a, b, '.mp4')}"
        assert e["latents"] == f"latents/{rng_name(a, b, '.safetensors')}"
        assert (e["sha256"], e["bytes"]) == file_sha256(tmp_path / e["file"])
        assert (e["latents_sha256"], e["latents_bytes"]) == file_sha256(tmp_path / e["latents"])
        lat, meta = sidecar(tmp_path / e["latents"])
        assert torch.equal(lat, torch.cat([latents_of(i) for i in range(a, b + 1)]))
        assert meta == {"first_chunk": str(a), "last_chunk": str(b), "frames_per_chunk": str(F)}
        assert read_mp4(tmp_path / e["file"]).shape == ((b - a + 1) * N, 2 * PX, 2 * PX, 3)
    assert read_manifest(tmp_path) == m and verify_stream_segments(tmp_path) == []


def test_without_keep_latents_a_decoded_stream_is_unchanged(tmp_path):
    m = write_stream(tmp_path, range(5), keep_latents=False)
    assert not (tmp_path / "latents").exists()
    assert [set(e) for e in m["segments"]] == [{"first", "last", "file", "sha256", "bytes"}] * 3


def test_integrity_checks_the_sidecar_too(tmp_path):
    m = write_stream(tmp_path, range(5))
    p = tmp_path / m["segments"][1]["latents"]
    data = bytearray(p.read_bytes())
    data[-3] ^= 1
    p.write_bytes(bytes(data))
    assert verify_stream_segments(tmp_path) == [
        f"latents/{p.name}: sha256 {file_sha256(p)[0][:16]}... differs from the manifest's "
        f"{m['segments'][1]['latents_sha256'][:16]}..."
    ]
    p.unlink()
    assert verify_stream_segments(tmp_path) == [f"latents/{p.name}: missing"]


def test_start_at_drops_segments_and_sidecars_at_or_past_the_resume_chunk(tmp_path):
    before = write_stream(tmp_path, range(5))
    (tmp_path / "latents" / ".00000004-00000004.safetensors.tmp-1-0badc0de").write_bytes(b"x")  # killed writer
    (tmp_path / "latents" / "00000006-00000007.safetensors").write_bytes(b"orphan")  # no mp4 of that range
    out = StreamOutput(tmp_path, "v", fps=8, segment_chunks=2, target_chunks=5, upscale=2, keep_latents=True)
    out.start_at(2)
    assert names(tmp_path / "segments") == ["00000000-00000001.mp4"]
    assert names(tmp_path / "latents") == ["00000000-00000001.safetensors"]
    for i in range(2, 5):
        out.write(chunk(i, offset=100.0))
    after = out.write_manifest("done", 2)
    assert after["segments"][0] == before["segments"][0]  # checksums of the kept pair survive the restart
    assert names(tmp_path / "latents") == [rng_name(a, b, ".safetensors") for a, b in RANGES]
    for e in after["segments"]:
        assert (e["latents_sha256"], e["latents_bytes"]) == file_sha256(tmp_path / e["latents"])
    assert torch.equal(
        sidecar(tmp_path / after["segments"][1]["latents"])[0], torch.cat([latents_of(2, 100.0), latents_of(3, 100.0)])
    )


def test_start_at_drops_a_sidecar_whose_mp4_was_never_committed(tmp_path):
    write_stream(tmp_path, range(5))
    (tmp_path / "segments" / "00000002-00000003.mp4").unlink()  # a crash between the two commits
    out = StreamOutput(tmp_path, "v", fps=8, segment_chunks=2, target_chunks=5, upscale=2, keep_latents=True)
    out.start_at(2)
    assert names(tmp_path / "latents") == ["00000000-00000001.safetensors"]


def test_keep_segments_prunes_the_sidecar_with_its_segment(tmp_path):
    out = StreamOutput(tmp_path, "v", fps=8, segment_chunks=2, target_chunks=None, keep_segments=2, keep_latents=True)
    out.start_at(0)
    for i in range(6):
        out.write(chunk(i))
    m = out.write_manifest("running", 6)
    kept = [(2, 3), (4, 5)]
    assert names(tmp_path / "segments") == [rng_name(a, b, ".mp4") for a, b in kept]
    assert names(tmp_path / "latents") == [rng_name(a, b, ".safetensors") for a, b in kept]
    assert [e["latents"] for e in m["segments"]] == [f"latents/{rng_name(a, b, '.safetensors')}" for a, b in kept]
    assert m["dropped_segments"] == 1


def test_a_failed_sidecar_commit_leaves_neither_file(tmp_path, monkeypatch):
    out = StreamOutput(tmp_path, "v", fps=8, segment_chunks=2, target_chunks=5, keep_latents=True)
    out.start_at(0)
    out.write(chunk(0))
    real = os.replace

    def fail_sidecar(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_sidecar)
    with pytest.raises(OSError):
        out.write(chunk(1))
    assert names(tmp_path / "segments") == [] and names(tmp_path / "latents") == []


def test_read_latents_returns_exactly_the_written_latents_of_a_range(tmp_path):
    write_stream(tmp_path, range(5))
    assert torch.equal(read_latents(tmp_path, 1, 2), torch.cat([latents_of(1), latents_of(2)]))  # spans two files
    assert torch.equal(read_latents(tmp_path, 0, 4), torch.cat([latents_of(i) for i in range(5)]))
    assert torch.equal(read_latents(tmp_path, 4, 4), latents_of(4))
    with pytest.raises(ValueError, match="chunk 5"):
        read_latents(tmp_path, 3, 5)
    lat = tmp_path / "lat"  # a latent-only stream: its segments are the latents
    out = StreamOutput(lat, "lat", fps=8, segment_chunks=2, target_chunks=5)
    out.start_at(0)
    for i in range(5):
        out.write(Chunk("lat", i, i * F, latents_of(i), torch.empty(0, dtype=torch.uint8)))
    assert not (lat / "latents").exists()
    assert torch.equal(read_latents(lat, 1, 3), torch.cat([latents_of(i) for i in (1, 2, 3)]))


# ---- export -------------------------------------------------------------------------------------
def make_run(tmp_path, **kw) -> RunSpec:
    spec = RunSpec(out_dir=str(tmp_path / "run"), model={}, streams=[StreamEntry(StreamSpec("v"), 5)], segment_chunks=2)
    spec.save()
    write_stream(spec.stream_dir("v"), range(5), **kw)
    return spec


def segment_paths(spec: RunSpec) -> list:
    m = read_manifest(spec.stream_dir("v"))
    return [spec.stream_dir("v") / e["file"] for e in m["segments"]]


@pytest.mark.parametrize("kw", [{}, {"crf": 18}, {"lossless": True}], ids=["crf0", "crf18-bframes", "lossless"])
def test_export_joins_mp4_segments_without_re_encoding(tmp_path, capsys, kw):
    spec = make_run(tmp_path, **kw)
    segs = segment_paths(spec)
    dst = tmp_path / "all.mp4"
    assert main(["export", "v", str(dst), "--out", spec.out_dir]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err and f"{5 * N} frames" in cap.out
    want = np.concatenate([read_mp4(p) for p in segs])
    got = read_mp4(dst)
    assert got.shape == (5 * N, 2 * PX, 2 * PX, 3) and np.array_equal(got, want)
    assert packets(dst) == [pk for p in segs for pk in packets(p)]  # the very same compressed packets
    with av.open(str(dst)) as c:
        pts = [f.pts for f in c.decode(video=0)]
    assert pts == sorted(set(pts))  # one timeline, no restarts at segment joins
    if kw.get("lossless"):
        assert np.array_equal(got, np.concatenate([frames_of(i).numpy().repeat(2, 1).repeat(2, 2) for i in range(5)]))


def test_remux_refuses_files_with_other_codec_parameters_and_writes_nothing(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    with Mp4Writer(a, fps=8) as wr:
        wr.write(rand_frames(2, 16, 16))
    with Mp4Writer(b, fps=8, lossless=True) as wr:
        wr.write(rand_frames(2, 16, 16))
    with pytest.raises(ParamsDiffer, match="codec|pix_fmt|profile|extradata"):
        remux_mp4([a, b], tmp_path / "ab.mp4")
    assert names(tmp_path) == ["a.mp4", "b.mp4"]


def test_export_of_segments_from_before_an_encoding_change_re_encodes_with_a_warning(tmp_path, capsys):
    spec = make_run(tmp_path)
    write_stream(spec.stream_dir("v"), range(2, 5), lossless=True)  # resumed at chunk 2, now lossless
    dst = tmp_path / "all.mp4"
    assert main(["export", "v", str(dst), "--out", spec.out_dir]) == 0
    cap = capsys.readouterr()
    assert cap.err.startswith("warning: stream v: segments differ in ") and cap.err.count("\n") == 1
    assert "re-encoding" in cap.err and f"{5 * N} frames" in cap.out
    assert read_mp4(dst).shape == (5 * N, 2 * PX, 2 * PX, 3)


def test_export_latents_of_a_decoded_stream_joins_its_sidecars(tmp_path, capsys):
    spec = make_run(tmp_path)
    dst = tmp_path / "all.safetensors"
    assert main(["export", "v", str(dst), "--latents", "--out", spec.out_dir]) == 0
    lat, meta = sidecar(dst)
    assert torch.equal(lat, torch.cat([latents_of(i) for i in range(5)]))
    assert meta == {"stream_id": "v", "first_chunk": "0", "last_chunk": "4", "frames_per_chunk": str(F)}
    assert f"latents [{5 * F}, {C}, {H}, {W}]" in capsys.readouterr().out
    assert main(["export", "v", str(tmp_path / "x.mp4"), "--latents", "--out", spec.out_dir]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()


def test_export_latents_refuses_a_stream_without_sidecars_or_with_a_damaged_one(tmp_path, capsys):
    spec = make_run(tmp_path, keep_latents=False)
    dst = tmp_path / "all.safetensors"
    assert main(["export", "v", str(dst), "--latents", "--out", spec.out_dir]) == 2
    assert "without a latent sidecar" in capsys.readouterr().err and not dst.exists()
    spec = make_run(tmp_path / "b")
    d = spec.stream_dir("v")
    m = json.loads((d / "manifest.json").read_text())
    p = d / m["segments"][2]["latents"]
    data = bytearray(p.read_bytes())
    data[-3] ^= 1  # tensor data: the header still parses, the checksum catches it
    p.write_bytes(bytes(data))
    assert main(["export", "v", str(dst), "--latents", "--out", spec.out_dir]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: stream v: damaged segments") and "latents/00000004-00000004.safetensors: sha256" in err
    )
    assert not dst.exists()
    assert main(["export", "v", str(tmp_path / "v.mp4"), "--out", spec.out_dir]) == 0  # the video is intact
