"""Segment integrity: verify_stream_segments / verify_run / check_resumable, and `longroll export`
refusing damaged segments and output paths inside the run directory."""

import json
import os
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.cli_common import UsageError
from orchestrator.integrity import check_resumable, verify_run, verify_stream_segments
from orchestrator.registry import RunSpec, StreamEntry
from workers.output import StreamOutput
from workers.types import Chunk, StreamSpec

F = 2


def latent_chunk(sid: str, i: int) -> Chunk:
    return Chunk(sid, i, i * F, torch.randn(F, 4, 2, 3, generator=torch.Generator().manual_seed(i)), torch.empty(0))


def video_chunk(sid: str, i: int) -> Chunk:
    return Chunk(sid, i, i, torch.zeros(1), torch.full((1, 2, 2, 3), 40 * i, dtype=torch.uint8))


def make_run(tmp_path, kinds=("latents",), state: str = "done", last_checkpoint: int | None = None) -> RunSpec:
    """A finished run directory (run.json + one stream per kind, 5 chunks in segments of 2), no Ray."""
    sids = [f"s{i}" for i in range(len(kinds))]
    spec = RunSpec(
        out_dir=str(tmp_path / "run"), model={}, streams=[StreamEntry(StreamSpec(s), 5) for s in sids], segment_chunks=2
    )
    spec.save()
    for sid, kind in zip(sids, kinds):
        out = StreamOutput(spec.stream_dir(sid), sid, fps=8, segment_chunks=2, target_chunks=5, upscale=2)
        out.start_at(0)
        for i in range(5):
            out.write((latent_chunk if kind == "latents" else video_chunk)(sid, i))
        out.write_manifest(state, last_checkpoint)
    return spec


def seg(spec: RunSpec, sid: str, name: str) -> Path:
    return next((spec.stream_dir(sid) / "segments").glob(f"{name}.*"))


def flip_byte(path: Path) -> None:
    """Change one byte near the end (tensor or video data; the header still parses), size unchanged."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot(d) -> dict:
    return {p: p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


def test_an_intact_stream_has_no_problems(tmp_path):
    spec = make_run(tmp_path, ("latents", "mp4"))
    assert verify_stream_segments(spec.stream_dir("s0")) == []
    assert verify_stream_segments(spec.stream_dir("s1")) == []
    assert verify_run(spec, []) == {}
    assert verify_stream_segments(tmp_path / "no-such-stream") == []


@pytest.mark.parametrize(
    "damage, says",
    [
        (flip_byte, "sha256"),
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "bytes, the manifest says"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["flipped-byte", "truncated", "missing"],
)
@pytest.mark.parametrize("kind", ["latents", "mp4"])
def test_damage_is_reported_per_segment(tmp_path, kind, damage, says):
    spec = make_run(tmp_path, (kind,))
    bad = seg(spec, "s0", "00000002-00000003")
    damage(bad)
    problems = verify_stream_segments(spec.stream_dir("s0"))
    assert len(problems) == 1 and problems[0].startswith(f"segments/{bad.name}: ") and says in problems[0]
    assert verify_run(spec) == {"s0": problems}


def test_segments_without_checksums_are_accepted_unverified(tmp_path):
    spec = make_run(tmp_path)
    d = spec.stream_dir("s0")
    m = json.loads((d / "manifest.json").read_text())
    m["segments"] = [{k: e[k] for k in ("first", "last", "file")} for e in m["segments"]]
    (d / "manifest.json").write_text(json.dumps(m))
    flip_byte(seg(spec, "s0", "00000000-00000001"))
    assert verify_stream_segments(d) == []
    seg(spec, "s0", "00000002-00000003").unlink()
    assert verify_stream_segments(d) == ["segments/00000002-00000003.safetensors: missing"]


def test_resume_refuses_only_damage_in_segments_it_would_keep(tmp_path):
    spec = make_run(tmp_path, ("latents", "latents"), state="stopped", last_checkpoint=4)
    flip_byte(seg(spec, "s0", "00000004-00000004"))  # past the checkpoint: regenerated on resume
    check_resumable(spec)
    flip_byte(seg(spec, "s1", "00000002-00000003"))  # before it: the resumed stream would keep it
    with pytest.raises(UsageError, match="s1: segments/00000002-00000003.safetensors: sha256"):
        check_resumable(spec)
    check_resumable(spec, ["s0"])


def test_resume_does_not_check_done_streams_or_streams_without_a_checkpoint(tmp_path):
    spec = make_run(tmp_path, ("latents",), state="done", last_checkpoint=4)
    flip_byte(seg(spec, "s0", "00000000-00000001"))
    check_resumable(spec)
    spec = make_run(tmp_path / "b", ("latents",), state="stopped", last_checkpoint=None)
    flip_byte(seg(spec, "s0", "00000000-00000001"))
    check_resumable(spec)  # restarts from chunk 0: every segment is regenerated


@pytest.mark.parametrize("kind, suffix", [("latents", ".safetensors"), ("mp4", ".mp4")])
def test_export_refuses_a_damaged_segment_and_writes_nothing(tmp_path, capsys, kind, suffix):
    spec = make_run(tmp_path, (kind,))
    flip_byte(seg(spec, "s0", "00000002-00000003"))
    dst = tmp_path / "out"
    dst.mkdir()
    assert main(["export", "s0", str(dst / f"all{suffix}"), "--out", spec.out_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stream s0: damaged segments") and err.count("\n") == 1
    assert f"00000002-00000003{suffix}: sha256" in err
    assert list(dst.iterdir()) == []


def test_export_of_an_intact_run_still_works(tmp_path, capsys):
    spec = make_run(tmp_path, ("latents",))
    assert main(["export", "s0", str(tmp_path / "all.safetensors"), "--out", spec.out_dir]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "all.safetensors").is_file()


@pytest.mark.parametrize("where", ["segment", "stream-dir", "via-symlink", "relative"])
def test_export_refuses_an_output_inside_the_run_directory(tmp_path, capsys, monkeypatch, where):
    spec = make_run(tmp_path, ("latents",))
    before = snapshot(tmp_path)
    target = seg(spec, "s0", "00000000-00000001")
    if where == "stream-dir":
        target = spec.stream_dir("s0") / "all.safetensors"
    elif where == "via-symlink":
        (tmp_path / "link").symlink_to(spec.stream_dir("s0") / "segments")
        before = snapshot(tmp_path)
        target = tmp_path / "link" / "00000000-00000001.safetensors"
    elif where == "relative":
        monkeypatch.chdir(spec.stream_dir("s0"))
        target = Path("segments") / "00000000-00000001.safetensors"
    assert main(["export", "s0", str(target), "--out", spec.out_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output file") and "inside the run directory" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_export_beside_the_run_directory_is_allowed(tmp_path):
    spec = make_run(tmp_path, ("latents",))
    (tmp_path / "run-exports").mkdir()  # a sibling whose name starts like the run's: not inside it
    assert main(["export", "s0", str(tmp_path / "run-exports" / "a.safetensors"), "--out", spec.out_dir]) == 0
    assert os.path.getsize(tmp_path / "run-exports" / "a.safetensors") > 0
