"""Output files that are complete or absent, and write errors that say what went wrong.

Every writer here writes into a temporary file in the destination's own folder (the same file system, so the final
rename is atomic), flushes and syncs it, and only then renames it over the destination. A failure at any point (a
full disk, a kill) leaves the old file as it was; the temporary file is removed on any error this process sees.

A full disk surfaces in different ways depending on the writer: `OSError` ENOSPC from Python's own writes,
"unexpected pos" from torch.save's zip writer, an "os error 28" inside a safetensors error. `write_error` turns
each into one `OSError` that names the file and says "no space left on device".
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

# phrases by which the writers we use report a full disk or quota
_FULL_DISK_MARKERS = ("no space left", "os error 28", "storagefull", "disk quota", "os error 122", "unexpected pos")


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name beside `path`, keeping its suffix (some writers pick the format by it)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def is_full_disk(error: BaseException) -> bool:
    """True when `error` reports a full disk or an exceeded quota, in any of the writers' ways."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _FULL_DISK_MARKERS)


def write_error(error: BaseException, path: Path) -> OSError:
    """The error to raise for a failed write of `path`: ENOSPC with the free space when the disk is full, else an
    OSError naming the file and the writer's message."""
    if is_full_disk(error):
        free = _free_bytes(path.parent)
        room = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return OSError(errno.ENOSPC, f"no space left on device while writing {path}{room}")
    if isinstance(error, OSError) and error.filename:
        return error
    code = error.errno if isinstance(error, OSError) else errno.EIO
    return OSError(code, f"could not write {path}: {error}")


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk; file systems that cannot are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_path(dst) as tmp:` write `tmp`; on leaving the block without an error it is synced and renamed
    to `dst`. Any error removes `tmp`, leaves `dst` untouched, and is raised as `write_error` says."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, (OSError, RuntimeError)) or (isinstance(e, Exception) and is_full_disk(e)):
            raise write_error(e, path) from e
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_png_atomic(image, path: str | os.PathLike) -> Path:
    """Write a PIL image as PNG at `path`, whole or not at all (the old file stays on any failure)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG")
    return Path(path)


def save_safetensors_atomic(
    tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


class _RecordingWriter(io.RawIOBase):
    """A binary file that remembers the OSError of a failed write: torch.save's zip writer swallows it and reports
    "unexpected pos" instead; this keeps the real cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise


def save_torch(obj, path: str | os.PathLike) -> Path:
    """torch.save into `path` (not atomic by itself: callers write into a temporary folder), with a failed write
    reported as the OSError it was."""
    path = Path(path)
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            raise write_error(writer.error or e, path) from e
        except OSError as e:
            raise write_error(e, path) from e
    return path


def replace_folder(tmp: Path, dst: Path) -> None:
    """Move the finished folder `tmp` to `dst`; an existing `dst` is removed only once the new one is in place."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = temporary_sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_folder(dst) as tmp:` fill the folder `tmp`; on success it replaces `dst` whole (see
    `replace_folder`); on any error it is removed and `dst` stays as it was."""
    path = Path(path)
    tmp = temporary_sibling(path, "partial")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            fsync_path(f)
        replace_folder(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_full_disk(e):
            raise write_error(e, path) from e
        raise
    fsync_path(path.parent)


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """Make sure `path` can be written before any slow work starts: a file path (its folder is created if needed,
    and must be writable; the path must not be a folder), or with `folder` a folder (created if needed, writable).
    Raises an OSError (or ValueError for a file/folder mix-up) that names the path; creates no file."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a folder")
        target = path
    else:
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give a file name")
        target = path.parent
    _make_folder(target)
    probe = temporary_sibling(target / "write-check")
    try:
        probe.open("xb").close()
    except OSError as e:
        raise OSError(e.errno, f"cannot write into {target}: {e.strerror}") from None
    probe.unlink()
    return path


def _make_folder(folder: Path) -> None:
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"cannot create the folder {folder}: {blocker} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder {folder}: {e.strerror}") from None
