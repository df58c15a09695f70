"""Writing files so that a crash never leaves a half-written one: temp file or folder, then rename.

Every output of the project (artifacts, JSON, figures, pages, checkpoints, the corpus cache) goes
through ``atomic_path`` or ``staged_folder``; both give their results the permissions the user's
umask asks for, like any other file the user writes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from lens.config import LensError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_ALLOWED = {errno.EROFS, errno.EACCES, errno.EPERM}


class OutputError(LensError, OSError):
    """An output that cannot be written: the disk is full, or the folder is read-only."""


def explained(err: OSError, path: Path, needed: int | None = None) -> OSError:
    """``err`` as an ``OutputError`` naming the path (and, for a full disk, the space), where it is one."""
    if err.errno in NO_SPACE:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
        size = f"{needed:,} bytes to write, " if needed is not None else ""
        return OutputError(err.errno, f"no space left on the device of {path} ({size}{free:,} bytes free): free some or choose another output_dir")
    if err.errno in NOT_ALLOWED:
        return OutputError(err.errno, f"cannot write {path}: {err.strerror} (a read-only folder?): choose another output_dir")
    return err


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
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    except OSError as err:
        raise explained(err, final) from err
    os.close(fd)
    tmp = Path(name)
    with_umask(tmp, 0o666)
    try:
        yield tmp
        os.replace(tmp, final)
    except OutputError:
        raise
    except OSError as err:
        raise explained(err, final) from err
    finally:
        if tmp.exists():
            tmp.unlink()


class _Sink:
    """A binary file that remembers the OS error of a failed write: serialisers such as
    ``torch.save`` re-raise it as their own error without the errno that says "disk full"."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def write_stream(path: Path, write: Callable[[BinaryIO], Any], needed: int | None = None) -> Path:
    """Write what ``write`` puts into a binary file to ``path`` atomically and durably (fsync before
    the rename), without first holding the whole output in memory."""
    with atomic_path(path) as tmp:
        sink = None
        try:
            with open(tmp, "wb") as f:  # the temp file keeps its mode: opened, not re-created
                sink = _Sink(f)
                write(sink)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise explained(err, path, needed) from err
        except Exception as err:
            if sink is not None and sink.error is not None:
                raise explained(sink.error, path, needed) from err
            raise
    return path


def write_bytes(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` atomically and durably."""
    return write_stream(path, lambda f: f.write(data), needed=len(data))


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
