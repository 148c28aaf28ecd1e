"""Safe outputs: checked before any work, written atomically, one writer per output directory.

* :func:`check_output_file` / :func:`check_output_dir` run before a command does its work: they refuse a
  directory where a file is wanted (and the reverse), create missing parent folders and prove the folder is
  writable, so a long run is never thrown away at the end because of its output path.
* :func:`read_json` reads a JSON file, a missing or broken one being one error naming it.
* :func:`atomic_write` (and the :func:`write_text` / :func:`write_json` / :func:`write_bytes` shortcuts)
  write a temporary file in the destination's own folder and ``os.replace`` it onto the final name: a reader
  sees the old file or the whole new one, never a partial file, whatever happens to the process.
* :func:`output_lock` takes ``DIR/.cgf-fhe.lock`` (an OS file lock, released when the process dies) so two
  runs never mix their outputs in one directory.
* A full disk (``ENOSPC``/``EDQUOT``) becomes :class:`~cgf_fhe.errors.OutputError` ``disk full: PATH``.

Only the standard library and ``filelock`` are imported here, so any module may use it cheaply.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import DataError, OutputError

LOCK_NAME = ".cgf-fhe.lock"
TMP_PREFIX = ".cgf-tmp-"  # every temporary file starts with this (tests look for leftovers by it)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def _writable_probe(folder: Path) -> None:
    """Create and delete a file in ``folder``: the only honest test of writability (os.access lies for root)."""
    try:
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".probe", dir=folder)
    except OSError as exc:
        if is_disk_full(exc):
            raise OutputError(f"disk full: {folder}") from None
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(name)


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` (and parents) if missing and check it is a writable directory; returns it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {p}: a parent path is a file, not a directory") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise OutputError(f"disk full: {p}") from None
        raise OutputError(f"cannot create {what} {p}: {exc.strerror or exc}") from None
    _writable_probe(p)
    return p


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that ``path`` can be written as a file (not a directory; its folder created and writable)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {p} is a directory; give a file name")
    check_output_dir(p.parent if str(p.parent) else Path("."), what=f"folder of {what}")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` in one step.

    On any error the temporary file is removed and ``path`` is left as it was; a full disk is reported as
    ``OutputError("disk full: PATH")``."""
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + final.name, dir=folder)  # keeps the extension
    except OSError as exc:
        if is_disk_full(exc):
            raise OutputError(f"disk full: {final}") from None
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(exc):
            raise OutputError(f"disk full: {final}") from None
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """``writer(tmp)`` writes the content to the temporary path; then it atomically becomes ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _w)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike, error: type[Exception] = DataError):
    """The JSON document at ``path``; a missing file or invalid JSON raises ``error`` naming the path (and, for
    invalid JSON, the line)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{p}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def write_json(path: str | os.PathLike, obj, **kwargs) -> Path:
    kwargs.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **kwargs))


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder/.cgf-fhe.lock`` for the block; a second holder gets an immediate, clear error."""
    from filelock import FileLock, Timeout

    d = check_output_dir(folder)
    lock = FileLock(str(d / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(f"another cgf-fhe command is writing to {d} (lock {d / LOCK_NAME}); wait for it "
                          "or choose another output") from None
    try:
        yield d
    finally:
        lock.release()


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``ENOSPC`` raised inside the block into ``OutputError("disk full: PATH")``."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise OutputError(f"disk full: {path}") from None
        raise
