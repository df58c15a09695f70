"""Writing files so that a crash never leaves a half-written one: temp file or folder, then rename.

Every output of the project (artifacts, JSON, figures, pages, checkpoints, the corpus cache) goes
through ``atomic_path`` or ``staged_folder``; both give their results the permissions the user's
umask asks for, like any other file the user writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def cache_dir() -> Path:
    """Where downloads and derived data are kept (``LENS_CACHE``, default ``~/.cache/lens``)."""
    return Path(os.environ.get("LENS_CACHE", Path.home() / ".cache" / "lens"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_umask(path: Path, mode: int) -> None:
    """Give ``path`` ``mode`` as the umask allows: ``mkstemp``/``mkdtemp`` make them owner-only."""
    path.chmod(mode & ~_umask())


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; rename it over ``final`` only if the body finished."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    with_umask(tmp, 0o666)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # the temp file keeps its mode: opened, not re-created
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_json(data: Any, path: Path) -> Path:
    return write_bytes((json.dumps(data, indent=2) + "\n").encode("utf-8"), path)


@contextmanager
def staged_folder(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``dst``; when the body finishes, it becomes ``dst``
    (an old ``dst`` is moved aside first, then deleted), so ``dst`` appears complete or not at all."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True (overwrite=true) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    with_umask(staging, 0o777)
    try:
        yield staging
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(staging, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
