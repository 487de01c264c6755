"""Segment integrity: does every segment a manifest lists still hold the bytes committed for it?

Each manifest entry carries the committed file's ``sha256`` and ``bytes`` (workers.output), and a
latent sidecar's ``latents_sha256`` / ``latents_bytes`` where it lists one (``latents``). A file
can still go bad afterwards: a disk or copy that flips bits, a truncating restore, a hand edit.
``longroll export`` verifies every segment it joins, so a damaged one is refused instead of being
joined into a video that plays with a glitch; :func:`check_resumable` lets ``longroll resume``
refuse to build on damaged segments that the restart would keep. Entries written before checksums
existed (no ``sha256`` / ``bytes``) are accepted as unverified.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.cli_common import UsageError
from orchestrator.registry import RunSpec
from workers.durable import file_sha256
from workers.output import read_manifest


def verify_segment(stream_dir: str | os.PathLike, entry: dict) -> str | None:
    """What is wrong with one manifest segment entry's file and its latent sidecar, if it lists one
    (``latents`` with ``latents_sha256`` / ``latents_bytes``); None when they match or are unverified."""
    problems = [_verify_file(stream_dir, str(entry.get("file")), entry.get("bytes"), entry.get("sha256"))]
    if "latents" in entry:
        problems.append(
            _verify_file(stream_dir, str(entry["latents"]), entry.get("latents_bytes"), entry.get("latents_sha256"))
        )
    return "; ".join(p for p in problems if p is not None) or None


def _verify_file(stream_dir: str | os.PathLike, name: str, want_bytes, want_sha) -> str | None:
    path = Path(stream_dir) / name
    try:
        size = path.stat().st_size
        if want_bytes is not None and size != want_bytes:  # cheap, and spares hashing a truncated file
            return f"{name}: {size} bytes, the manifest says {want_bytes}"
        if want_sha is None:
            return None
        got, _ = file_sha256(path)
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as e:
        return f"{name}: unreadable: {e.strerror or e}"
    if got != want_sha:
        return f"{name}: sha256 {got[:16]}... differs from the manifest's {str(want_sha)[:16]}..."
    return None


def verify_stream_segments(stream_dir: str | os.PathLike) -> list[str]:
    """Problems with the segments one stream's manifest lists: missing, wrong size or wrong sha256.

    An empty list when every listed segment is fine (or unverified), or when there is no manifest.
    """
    m = read_manifest(Path(stream_dir)) or {}
    return [p for e in m.get("segments") or [] if (p := verify_segment(stream_dir, e)) is not None]


def verify_run(spec: RunSpec, stream_ids: list[str] | None = None) -> dict[str, list[str]]:
    """{stream id: problems} for the streams (default: all of the run's) that have any; {} when all are fine."""
    ids = stream_ids or [e.spec.stream_id for e in spec.streams]
    found = {sid: verify_stream_segments(spec.stream_dir(sid)) for sid in ids}
    return {sid: problems for sid, problems in found.items() if problems}


def check_resumable(spec: RunSpec, stream_ids: list[str] | None = None) -> None:
    """Refuse (UsageError: exit 2, nothing written) to resume streams whose kept segments are damaged.

    A resumed stream restarts at its checkpoint and regenerates every segment from there on, so only
    segments ending before the manifest's ``last_checkpoint`` survive the restart; a bad one among
    those would stay in the stream for good. Streams already done are not resumed and not checked
    here (``longroll export`` checks them).
    """
    bad = []
    for sid in stream_ids or [e.spec.stream_id for e in spec.streams]:
        m = spec.manifest(sid) or {}
        ckpt = m.get("last_checkpoint")
        if m.get("state") == "done" or ckpt is None:  # no checkpoint: the stream starts over from chunk 0
            continue
        kept = [e for e in m.get("segments") or [] if e.get("last", ckpt) < ckpt]
        bad += [f"{sid}: {p}" for e in kept if (p := verify_segment(spec.stream_dir(sid), e)) is not None]
    if bad:
        raise UsageError(f"damaged segments that resuming would keep: {'; '.join(bad)}")
