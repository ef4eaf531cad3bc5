"""Building the project's small native libraries (train/csrc) on first use, into a cache folder.

Each library is compiled once per source, compiler and flags into `$MUSE_CACHE` (else `~/.cache/muse`) and loaded
with ctypes. The build is atomic (a concurrent build finds a whole file or none); a machine without the compiler
gets an OSError naming what is missing, which each caller turns into its fallback.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MUSE_CACHE") or Path.home() / ".cache" / "muse")


def cpu_identity() -> bytes:
    """What -march=native compiles for (a cache shared between machines must not hand one's build to another)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
    return "".join(sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})).encode()


def find_compiler(env: str, names: tuple[str, ...]) -> str:
    """$env if set, else the first of `names` on the PATH; OSError if none."""
    found = os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)
    if found is None:
        raise OSError(f"no compiler (${env}, or one of {', '.join(names)} on the PATH)")
    return found


def build(name: str, source: Path, compiler: str, flags: list[str], libs: list[str], key: bytes = b"") -> Path:
    """`compiler flags source -o lib<name>-<hash>.so libs` in the cache folder, unless it is there already; the hash
    covers the source, the compiler's version, the flags, the libraries and `key` (what else the build depends on)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [source.read_bytes(), version.encode(), " ".join(flags + libs).encode(), key]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, *flags, str(source), "-o", str(built), *libs], capture_output=True, check=True)
            os.replace(built, target)
    return target
