"""A caching allocator for the CPU tensors of a training run: what CUDA's caching allocator does, for the CPU.

Why. A training step allocates and frees the same tensors in the same order every step. glibc's heap serves them
from one arena in which the saved activations (live until the backward) and the step's temporaries interleave: freed
holes seldom fit the next request, and the heap grows well past what is live at once (docs/training.md, "Where the
LoRA peak goes"). `caching()` makes torch's CPU allocator one that keeps each freed block of 64 KiB or more in a free
list of its size class (eight per power of two) and hands it to the next request of that class or of one at most a
quarter smaller (so that tensors whose size varies from step to step, the loss's masked rows, share blocks). From the second step
on the step's memory is the sum over size classes of the blocks in use at once, and no block is returned to the
system and faulted in again. Values are untouched: the allocator decides only where a tensor lives.

The allocator is `train/csrc/cpu_cache.cpp`, built on first use with the system's C++ compiler (`$CXX`, or c++,
g++, clang++) against torch's own headers and libc10, into the cache folder of `train.native`. Without a compiler
`caching()` logs that it runs on torch's own allocator and changes nothing.

    with cpu_cache.caching():        # torch's CPU allocator is the caching one inside
        ...                          # train
    # outside: the previous allocator again; the idle blocks are freed, those still in use when their tensors go
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_cache.cpp"

_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _compile() -> Path:
    """The shared library built from SOURCE against this torch (its headers, libc10 and C++ ABI)."""
    cxx = native.find_compiler("CXX", ("c++", "g++", "clang++"))
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}"]
    libs = [f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    return native.build("cpu_cache", SOURCE, cxx, flags, libs, key=torch.__version__.encode())


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(str(_compile()))
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            log.warning("CPU caching allocator unavailable, torch's own allocator is used (%s)", detail)
            _lib = False
            return None
        lib.muse_cpu_cache_enable.restype = ctypes.c_int
        lib.muse_cpu_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        _lib = lib
    return _lib or None


def available() -> bool:
    """Whether the allocator is built (compiling it if it is not yet)."""
    return _load() is not None


def return_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing): after freeing a
    phase's networks, so that their holes are not resident beside what comes next. Whether it could."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


@dataclass(frozen=True)
class Stats:
    """Bytes held by the caching allocator: `reserved` (in use or idle), `in_use`, `peak` in use since the
    previous `stats()` call, and `requested`, the bytes asked for of the blocks in use (each block is at most a
    size class, 12.5%, larger, or a quarter more when it was idle at a larger class)."""

    reserved: int
    in_use: int
    peak: int
    requested: int


def stats() -> Stats:
    lib = _load()
    if lib is None:
        return Stats(0, 0, 0, 0)
    out = (ctypes.c_uint64 * 4)()
    lib.muse_cpu_cache_stats(out)
    return Stats(*out)


def empty() -> None:
    """Free the idle blocks (those in use stay)."""
    if (lib := _load()) is not None:
        lib.muse_cpu_cache_empty()


@contextlib.contextmanager
def caching(enabled: bool = True) -> Iterator[bool]:
    """Inside, torch's CPU tensors come from the caching allocator (when `enabled` and it builds); yields whether
    they do. On exit from the outermost such block the previous allocator is put back and the idle blocks are
    freed."""
    lib = _load() if enabled else None
    if lib is None or not lib.muse_cpu_cache_enable():
        yield False
        return
    try:
        yield True
    finally:
        lib.muse_cpu_cache_disable()
