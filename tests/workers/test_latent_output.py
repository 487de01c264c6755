"""Latent-only streams (no VAE decoder): safetensors segments, manifests, previews and `longroll export`."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from orchestrator.cli import main
from orchestrator.registry import RunSpec, StreamEntry
from workers.output import StreamOutput, list_segments, read_manifest
from workers.preview import preview_png
from workers.types import Chunk, StreamSpec

F, C, H, W = 3, 16, 4, 6  # latent frames per chunk, channels, latent height and width
NO_FRAMES = torch.empty(0, dtype=torch.uint8)


def fake_latents(i: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(F, C, H, W, generator=g) + offset


def latent_chunk(i: int, offset: float = 0.0) -> Chunk:
    return Chunk("lat", i, i * F, fake_latents(i, offset), NO_FRAMES)


def write_stream(stream_dir, chunks: range, offset: float = 0.0, start: int | None = None) -> StreamOutput:
    out = StreamOutput(stream_dir, "lat", fps=16, segment_chunks=2, target_chunks=5)
    out.start_at(chunks.start if start is None else start)
    closed = [out.write(latent_chunk(i, offset)) for i in chunks]
    out.write_manifest("done" if chunks.stop == 5 else "running", None)
    assert closed == [(i + 1) % 2 == 0 or i == 4 for i in chunks]
    return out


def segment(path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents"), f.metadata()


def test_latent_chunks_are_written_as_safetensors_segments_with_a_manifest(tmp_path):
    d = tmp_path / "lat"
    write_stream(d, range(5))
    names = sorted(p.name for p in (d / "segments").iterdir())
    assert names == ["00000000-00000001.safetensors", "00000002-00000003.safetensors", "00000004-00000004.safetensors"]
    for first, last in [(0, 1), (2, 3), (4, 4)]:
        lat, meta = segment(d / "segments" / f"{first:08d}-{last:08d}.safetensors")
        want = torch.cat([fake_latents(i) for i in range(first, last + 1)])
        assert lat.dtype == torch.float32 and torch.equal(lat, want)
        assert meta == {"first_chunk": str(first), "last_chunk": str(last), "frames_per_chunk": str(F)}
    m = read_manifest(d)
    assert m["output"] == "latents" and m["state"] == "done"
    assert (m["chunks_done"], m["frames_per_chunk"], m["frames_done"]) == (5, F, 5 * F)
    assert [s["file"] for s in m["segments"]] == [f"segments/{n}" for n in names]
    assert [(s["first"], s["last"]) for s in m["segments"]] == list_segments(d / "segments")


def test_latents_are_copied_when_written(tmp_path):
    out = StreamOutput(tmp_path, "lat", fps=16, segment_chunks=2, target_chunks=None)
    out.start_at(0)
    c = latent_chunk(0)
    want = c.latents.clone()
    out.write(c)
    c.latents.fill_(7.0)  # a generator reusing its buffer must not change the open segment
    out.write(latent_chunk(1))
    lat, _ = segment(tmp_path / "segments" / "00000000-00000001.safetensors")
    assert torch.equal(lat[:F], want)


def test_restart_in_the_middle_drops_later_segments_and_regenerated_ones_replace(tmp_path):
    d = tmp_path / "lat"
    write_stream(d, range(5))
    seg = d / "segments"
    (seg / ".open-00000004.safetensors").write_bytes(b"partial")  # a worker that died mid-segment
    (seg / "00000004-00000004.mp4").write_bytes(b"")  # a segment of the other kind past the restart point
    out = StreamOutput(d, "lat", fps=16, segment_chunks=2, target_chunks=5)
    out.start_at(2)
    assert sorted(p.name for p in seg.iterdir()) == ["00000000-00000001.safetensors"]
    for i in range(2, 5):
        out.write(latent_chunk(i, offset=100.0))
    m = out.write_manifest("done", 2)
    assert [s["file"] for s in m["segments"]] == [
        "segments/00000000-00000001.safetensors",
        "segments/00000002-00000003.safetensors",
        "segments/00000004-00000004.safetensors",
    ]
    assert sorted(p.name for p in seg.iterdir()) == [s["file"].split("/")[1] for s in m["segments"]]
    assert torch.equal(segment(seg / "00000000-00000001.safetensors")[0], torch.cat([fake_latents(0), fake_latents(1)]))
    want = torch.cat([fake_latents(2, 100.0), fake_latents(3, 100.0)])
    assert torch.equal(segment(seg / "00000002-00000003.safetensors")[0], want)
    assert m["frames_done"] == 5 * F


def test_abort_leaves_no_partial_file_and_kinds_do_not_mix(tmp_path):
    out = StreamOutput(tmp_path, "lat", fps=16, segment_chunks=4, target_chunks=None)
    out.start_at(0)
    out.write(latent_chunk(0))
    out.abort()
    assert list((tmp_path / "segments").iterdir()) == []
    out.start_at(0)
    for i in range(4):
        out.write(latent_chunk(i))
    frames = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="latents"):
        out.write(Chunk("lat", 4, 4 * F, torch.zeros(1), frames))


def test_num_frames_counts_latent_frames_without_decoded_frames():
    assert latent_chunk(0).num_frames == F
    stub = Chunk("s", 0, 0, torch.zeros(1), torch.zeros(1, 2, 2, 3, dtype=torch.uint8))  # StubGenerator's chunk
    assert stub.num_frames == 1


def test_preview_of_a_latent_chunk_is_a_false_colour_png():
    lat = fake_latents(0)
    lat[-1, 2] = 5.0  # a constant channel: black, not NaN
    png = preview_png(NO_FRAMES, latents=lat)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape == (64, 96, 3)  # 4x6 upscaled x16 (nearest) to a 64 px short side
    r = img[::16, ::16, 0].astype(np.float64)
    x = lat[-1, 0].numpy().astype(np.float64)
    assert np.allclose(r, (x - x.min()) / (x.max() - x.min()) * 255, atol=0.51)
    assert (img[..., 0].min(), img[..., 0].max()) == (0, 255) and img[..., 2].max() == 0
    with pytest.raises(ValueError, match="no decoded frames"):
        preview_png(NO_FRAMES)  # the worker logs this one and goes on


def make_run(tmp_path, sid: str = "lat") -> RunSpec:
    spec = RunSpec(out_dir=str(tmp_path / "run"), model={}, streams=[StreamEntry(StreamSpec(sid), 5)], segment_chunks=2)
    spec.save()
    return spec


def test_export_of_a_latent_stream_round_trips_the_latents(tmp_path, capsys):
    spec = make_run(tmp_path)
    write_stream(spec.stream_dir("lat"), range(5))
    dst = tmp_path / "all.safetensors"
    assert main(["export", "lat", str(dst), "--out", spec.out_dir]) == 0
    got = load_file(dst)
    assert list(got) == ["latents"]
    assert torch.equal(got["latents"], torch.cat([fake_latents(i) for i in range(5)]))
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == {"stream_id": "lat", "first_chunk": "0", "last_chunk": "4", "frames_per_chunk": str(F)}
    assert "latents [15, 16, 4, 6]" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["all.mp4", "all.pt", "all"])
def test_export_with_a_suffix_that_does_not_fit_the_stream_writes_nothing(tmp_path, capsys, name):
    spec = make_run(tmp_path)
    write_stream(spec.stream_dir("lat"), range(5))
    dst = tmp_path / "x"
    dst.mkdir()
    assert main(["export", "lat", str(dst / name), "--out", spec.out_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and ".safetensors" in err
    assert list(dst.iterdir()) == []


def test_export_refuses_gapped_or_missing_segments(tmp_path, capsys):
    spec = make_run(tmp_path)
    d = spec.stream_dir("lat")
    write_stream(d, range(5))
    dst = tmp_path / "x.safetensors"
    m = json.loads((d / "manifest.json").read_text())
    gapped = {**m, "segments": [m["segments"][0], m["segments"][2]]}
    (d / "manifest.json").write_text(json.dumps(gapped))
    assert main(["export", "lat", str(dst), "--out", spec.out_dir]) == 2
    assert "gap after chunk 1" in capsys.readouterr().err
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "segments" / "00000002-00000003.safetensors").unlink()
    assert main(["export", "lat", str(dst), "--out", spec.out_dir]) == 2
    assert "missing" in capsys.readouterr().err
    (d / "segments" / "00000002-00000003.safetensors").write_bytes(b"not a safetensors file")
    assert main(["export", "lat", str(dst), "--out", spec.out_dir]) == 2
    assert "not a latent segment" in capsys.readouterr().err
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_export_of_an_mp4_stream_still_joins_video_and_refuses_safetensors(tmp_path, capsys):
    spec = make_run(tmp_path, "vid")
    out = StreamOutput(spec.stream_dir("vid"), "vid", fps=8, segment_chunks=2, target_chunks=5, upscale=4)
    out.start_at(0)
    for i in range(5):
        out.write(Chunk("vid", i, i, torch.zeros(1), torch.full((1, 2, 2, 3), 40 * i, dtype=torch.uint8)))
    m = out.write_manifest("done", None)
    assert m["output"] == "mp4" and m["segments"][-1]["file"] == "segments/00000004-00000004.mp4"
    assert main(["export", "vid", str(tmp_path / "v.safetensors"), "--out", spec.out_dir]) == 2
    assert "must end in .mp4" in capsys.readouterr().err and not (tmp_path / "v.safetensors").exists()
    assert main(["export", "vid", str(tmp_path / "v.mp4"), "--out", spec.out_dir]) == 0
    from workers.video import read_mp4

    assert read_mp4(tmp_path / "v.mp4").shape == (5, 8, 8, 3)
