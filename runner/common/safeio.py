"""Writes that are complete or absent: what a later command reads (records, checkpoints, the adapter) never
exists half-written, whatever stops the process (a full disk, a kill, a power cut after the rename)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems cannot open a directory; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary name beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent, ensure_ascii=False))


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` (and the folders) to disk."""
    root = Path(root)
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


@contextlib.contextmanager
def folder(path: str | Path):
    """Yield a temporary folder beside ``path``; when the block ends without an error, flush it and rename it to
    ``path`` (an existing ``path`` is replaced); otherwise remove it. ``path`` is never seen half-filled."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def nearest_existing(path: str | Path) -> Path:
    """``path`` itself or its nearest parent that exists: whether the rest of it can be made as folders (it can
    when that one is a folder)."""
    path = Path(path)
    for p in (path, *path.parents):
        try:
            p.stat()
            return p
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symbolic link loop on the way: the machine's fault, told before any
                raise  # work (errors.classify names it), not when the first file is written
    return Path(".")
