"""Atomic, durable file commits: what a reader sees after a crash is the old file or the new one, whole.

``os.replace`` alone makes a commit atomic but not durable: after a power loss the rename may be on
disk while the file's data is not (a 0-byte or garbage manifest), or the rename itself may be lost.
Every commit here therefore goes: write a hidden temp file in the target's directory, flush and
``fsync`` it, ``os.replace`` it onto the target, ``fsync`` the directory (so the new name is on disk).
On any failure (ENOSPC, EACCES, EIO, an interrupt, ...) the temp file is removed before the error is
re-raised, so a full disk leaves no half-written or 0-byte temp files behind to fill it further.

The ``durable`` keyword exists only so ``bench/durability.py`` can measure what the fsyncs cost;
production code never passes it (there is deliberately no environment variable or module switch).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# fsync of a directory is refused by a few filesystems (some FUSE and network mounts) that order
# metadata on their own; a durability step the filesystem cannot take must not fail every commit.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_HASH_BLOCK = 1 << 20


def temp_path(target: str | os.PathLike) -> Path:
    """A hidden, unique temp name beside ``target`` (same directory: the rename stays on one filesystem)."""
    t = Path(target)
    return t.with_name(f".{t.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: str | os.PathLike, *, durable: bool = True) -> None:
    """fsync a directory, making the names created, renamed or removed in it durable."""
    if not durable or os.name == "nt":  # Windows cannot open a directory for fsync (NTFS journals names)
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
        log.debug("durable.dir_fsync_unsupported", path=str(path), errno=e.errno)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and (unless ``durable=False``) durably.

    The temp file is created with O_EXCL and mode 0o666 (the umask applies, as for a plain open), so
    the committed file gets the permissions an ordinary write would have given it.
    """
    target = Path(path)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(target.parent, durable=durable)


def commit_file(tmp: str | os.PathLike, target: str | os.PathLike, *, durable: bool = True) -> None:
    """Commit a finished file written elsewhere (a closed mp4): fsync it, rename onto ``target``, fsync the dir.

    ``tmp`` is removed if any step fails, so an aborted commit leaves neither file half-there.
    """
    tmp, target = Path(tmp), Path(target)
    try:
        if durable:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(target.parent, durable=durable)
    if tmp.parent.resolve() != target.parent.resolve():  # the old name's removal lives in the other dir
        fsync_dir(tmp.parent, durable=durable)


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in 1 MiB blocks (segments can outgrow memory)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n
