"""Writes that are complete or absent: what a later command reads (records, checkpoints, the adapter) never
exists half-written, whatever stops the process (a full disk, a kill, a power cut after the rename)."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
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
    """A name of this writer's own beside ``path``: two processes (or threads) writing one file never share one."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def sha256(path: str | Path) -> str:
    """The file's SHA-256, read in 4 MB blocks (a multi-GB file costs no memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
def folder(path: str | Path, replace: bool = True):
    """Yield a temporary folder of this writer's own beside ``path`` (``<name>.<pid>-<token>.partial``); when the
    block ends without an error, flush it and rename it to ``path``; otherwise remove it. ``path`` is never seen
    half-filled. ``replace``: an existing ``path`` is replaced (the one process holding a run folder rewrites its
    adapter); False: a ``path`` that appeared meanwhile (another writer finished first) is refused with
    FileExistsError and left as it is, never replaced."""
    path = Path(path)
    _remove_abandoned(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        if not replace:
            path.mkdir()  # claims the name: FileExistsError when another writer's folder is there
        os.replace(tmp, path)  # over the empty folder just made, atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _remove_abandoned(path: Path) -> None:
    """Remove ``path``'s temporary folders left by writers that were killed (their process is gone); a live
    writer's is its own and stays."""
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.*.partial") if path.parent.is_dir() else ():
        pid = tmp.name[len(path.name) + 1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path.with_name(f"{path.name}.partial"), ignore_errors=True)  # an older runner's name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's live process
    return True


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
