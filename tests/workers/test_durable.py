"""Durable commits (workers.durable) and where they are used: no temp file survives a failed write,
the file and its directory are fsynced in order, and each committed segment's sha256 is recorded."""

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess

import pytest
import torch

from workers import durable
from workers.checkpoints import CheckpointStore
from workers.config import ModelConfig
from workers.durable import commit_file, file_sha256, fsync_dir, write_atomic
from workers.generator import Generator
from workers.output import StreamOutput, read_manifest, write_json_atomic
from workers.types import Chunk, StreamSpec

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def hidden(d) -> list[str]:
    """Names starting with '.' anywhere under d: temp files a failed or interrupted commit left."""
    return sorted(name for _, dirs, files in os.walk(d) for name in dirs + files if name.startswith("."))


@pytest.fixture
def fsyncs(monkeypatch):
    """Record (inode, is_directory) of every fsync: the inode survives the rename, so it names the file."""
    calls = []
    real = os.fsync

    def record(fd):
        st = os.fstat(fd)
        calls.append((st.st_ino, stat.S_ISDIR(st.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def ino(path) -> tuple[int, bool]:
    st = os.stat(path)
    return st.st_ino, stat.S_ISDIR(st.st_mode)


@pytest.fixture(scope="module")
def gen():
    return Generator(ModelConfig.from_name("tiny"))


# ---- the helpers ---------------------------------------------------------------------------------
def test_write_atomic_fsyncs_the_file_then_its_directory(tmp_path, fsyncs):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.json"]
    assert fsyncs == [ino(target), ino(tmp_path)]


def test_write_atomic_gives_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644


def test_durable_false_fsyncs_nothing(tmp_path, fsyncs):
    write_atomic(tmp_path / "a", b"x", durable=False)
    src = tmp_path / "src"
    src.write_bytes(b"y")
    commit_file(src, tmp_path / "b", durable=False)
    write_json_atomic(tmp_path / "c.json", {"k": 1}, durable=False)
    assert fsyncs == [] and sorted(os.listdir(tmp_path)) == ["a", "b", "c.json"]


def test_commit_file_fsyncs_the_file_then_the_directory(tmp_path, fsyncs):
    src = tmp_path / ".open.mp4"
    src.write_bytes(b"video")
    commit_file(src, tmp_path / "seg.mp4")
    assert os.listdir(tmp_path) == ["seg.mp4"] and (tmp_path / "seg.mp4").read_bytes() == b"video"
    assert fsyncs == [ino(tmp_path / "seg.mp4"), ino(tmp_path)]


def test_commit_file_into_another_directory_fsyncs_both(tmp_path, fsyncs):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"z")
    commit_file(tmp_path / "a" / "f", tmp_path / "b" / "f")
    assert fsyncs == [ino(tmp_path / "b" / "f"), ino(tmp_path / "b"), ino(tmp_path / "a")]


def test_fsync_dir_tolerates_filesystems_that_refuse_it(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    fsync_dir(tmp_path)  # EINVAL: the filesystem does not fsync directories; not a failed commit
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as e:
        fsync_dir(tmp_path)
    assert e.value.errno == errno.EIO


def test_failed_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def full(src, dst):
        raise ENOSPC

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        write_json_atomic(target, {"state": "running"})
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["manifest.json"] and target.read_bytes() == b"old"


class _FailingFile:
    """A file whose write fails as a full disk makes it fail (after the temp file was created)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise ENOSPC

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_failed_write_or_fsync_leaves_no_temp(tmp_path, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FailingFile(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path / "a", b"x" * 1000)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        write_atomic(tmp_path / "a", b"x")
    src = tmp_path / ".tmp-seg"
    src.write_bytes(b"v")
    with pytest.raises(OSError, match="I/O error"):
        commit_file(src, tmp_path / "seg")
    assert os.listdir(tmp_path) == []


def test_file_sha256_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 7)  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == (hashlib.sha256(data).hexdigest(), len(data))


# ---- a real full disk ----------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root / CAP_SYS_ADMIN; skipped where mounting is impossible)."""
    d = tmp_path / "small"
    d.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount binaries")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {(r.stderr or r.stdout).strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False, capture_output=True)


def test_writes_until_the_disk_is_really_full_leave_no_temp(tiny_disk):
    block = os.urandom(200 * 1024)
    written = []
    with pytest.raises(OSError) as e:
        for i in range(20):  # 1 MiB holds at most 5
            write_atomic(tiny_disk / f"f{i}", block)
            written.append(f"f{i}")
    assert e.value.errno == errno.ENOSPC and 1 <= len(written) < 6
    assert sorted(os.listdir(tiny_disk)) == sorted(written)
    assert all((tiny_disk / n).read_bytes() == block for n in written)
    write_atomic(tiny_disk / "small", b"fits")  # the failed temp file's space was given back


def test_checkpoints_until_the_disk_is_full_leave_the_last_whole_one(gen, tiny_disk):
    store = CheckpointStore(str(tiny_disk), "s1", keep=1000)
    state = gen.new_stream(StreamSpec("s1", seed=3))
    saved = []
    with pytest.raises(OSError) as e:
        for _ in range(1000):
            state.next_chunk += 1  # a new checkpoint directory each time; the payload stays the same size
            saved.append(store.save(state))
    assert e.value.errno == errno.ENOSPC and saved
    assert hidden(tiny_disk) == []
    loaded, _ = store.load_latest()
    assert loaded.chunk == saved[-1]


# ---- where commits happen ------------------------------------------------------------------------
def test_checkpoint_fsyncs_state_then_meta_then_the_checkpoints_dir(gen, tmp_path, fsyncs):
    store = CheckpointStore(str(tmp_path), "s1")
    state = gen.new_stream(StreamSpec("s1", seed=3))
    chunk = store.save(state)
    d = tmp_path / "s1" / "checkpoints" / f"{chunk:08d}"
    want = [ino(d / "state.safetensors"), ino(d), ino(d / "meta.json"), ino(d), ino(d.parent)]
    assert fsyncs[: len(want)] == want
    assert set(fsyncs[len(want) :]) == {ino(tmp_path / "s1"), ino(tmp_path)}  # once: folders create_dir made
    fsyncs.clear()
    state.next_chunk += 1
    store.save(state)
    assert fsyncs[-1] == ino(d.parent) and len(fsyncs) == 5


def test_object_store_checkpoints_are_not_fsynced(gen, fsyncs):
    store = CheckpointStore("mock:///root", "s1")
    state = gen.new_stream(StreamSpec("s1", seed=3))
    store.save(state)
    loaded, skipped = store.load_latest()
    assert fsyncs == [] and skipped == () and loaded.chunk == state.next_chunk


def test_checkpoint_whose_meta_write_fails_leaves_no_temp_and_is_skipped(gen, tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), "s1")
    state = gen.new_stream(StreamSpec("s1", seed=3))
    first = store.save(state)
    real = os.replace

    def meta_fails(src, dst):
        if str(dst).endswith("meta.json"):
            raise ENOSPC
        real(src, dst)

    monkeypatch.setattr(os, "replace", meta_fails)
    state.next_chunk += 1
    with pytest.raises(OSError):
        store.save(state)
    assert hidden(tmp_path) == []
    loaded, skipped = store.load_latest()
    assert loaded.chunk == first and len(skipped) == 1


def test_stream_state_save_is_durable(gen, tmp_path, fsyncs):
    state = gen.new_stream(StreamSpec("s1", seed=3))
    state.save(tmp_path)
    assert fsyncs == [ino(tmp_path / "state.safetensors"), ino(tmp_path), ino(tmp_path / "meta.json"), ino(tmp_path)]


F = 2


def latent_chunk(i: int) -> Chunk:
    return Chunk("s", i, i * F, torch.randn(F, 4, 2, 3, generator=torch.Generator().manual_seed(i)), torch.empty(0))


def video_chunk(i: int) -> Chunk:
    return Chunk("s", i, i, torch.zeros(1), torch.full((1, 2, 2, 3), 40 * i, dtype=torch.uint8))


CHUNKS = {"latents": latent_chunk, "mp4": video_chunk}


def write(d, kind: str, chunks: range, start: int | None = None) -> dict:
    out = StreamOutput(d, "s", fps=8, segment_chunks=2, target_chunks=5, upscale=2)
    out.start_at(chunks.start if start is None else start)
    for i in chunks:
        out.write(CHUNKS[kind](i))
    return out.write_manifest("running", None)


def sha_of(d, entry) -> tuple[str, int]:
    data = (d / entry["file"]).read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.mark.parametrize("kind", ["latents", "mp4"])
def test_manifest_records_each_segments_sha256_and_size(tmp_path, kind, fsyncs):
    m = write(tmp_path, kind, range(5))
    assert len(m["segments"]) == 3
    for e in m["segments"]:
        assert (e["sha256"], e["bytes"]) == sha_of(tmp_path, e)
        seg = tmp_path / e["file"]
        i = fsyncs.index(ino(seg))
        assert fsyncs[i + 1] == ino(seg.parent)  # the file, then the name it was committed under
    assert hidden(tmp_path) == [] and read_manifest(tmp_path) == m


@pytest.mark.parametrize("kind", ["latents", "mp4"])
def test_a_resumed_stream_keeps_the_checksums_of_its_earlier_segments(tmp_path, kind):
    before = write(tmp_path, kind, range(5))
    after = write(tmp_path, kind, range(2, 4), start=2)  # restart from checkpoint 2, regenerate 2..3
    assert [e["file"] for e in after["segments"]] == [e["file"] for e in before["segments"][:2]]
    assert after["segments"][0] == before["segments"][0]
    for e in after["segments"]:
        assert (e["sha256"], e["bytes"]) == sha_of(tmp_path, e)


def test_segments_from_before_checksums_stay_unverified_after_a_resume(tmp_path):
    m = write(tmp_path, "latents", range(5))
    legacy = {**m, "segments": [{k: e[k] for k in ("first", "last", "file")} for e in m["segments"]]}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    after = write(tmp_path, "latents", range(4, 5), start=4)
    assert [set(e) for e in after["segments"]] == [{"first", "last", "file"}] * 2 + [
        {"first", "last", "file", "sha256", "bytes"}
    ]


@pytest.mark.parametrize("kind", ["latents", "mp4"])
def test_a_segment_commit_that_fails_leaves_no_temp(tmp_path, kind, monkeypatch):
    out = StreamOutput(tmp_path, "s", fps=8, segment_chunks=2, target_chunks=5, upscale=2)
    out.start_at(0)
    out.write(CHUNKS[kind](0))

    def full(src, dst):
        raise ENOSPC

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        out.write(CHUNKS[kind](1))  # closes the segment
    assert os.listdir(tmp_path / "segments") == []


def test_temp_names_are_hidden_and_unique(tmp_path):
    a, b = durable.temp_path(tmp_path / "x"), durable.temp_path(tmp_path / "x")
    assert a != b and a.name.startswith(".x.tmp-") and a.parent == tmp_path
