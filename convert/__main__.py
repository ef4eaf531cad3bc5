"""`muse convert SRC DST` (or `python -m convert SRC DST`): [--to ours|diffusers] [--variant fp16] [--dtype float32|float16|bfloat16]

SRC: a published diffusers pipeline folder, a hub id (amused/amused-256), an open-muse checkpoint folder, or one of
ours. DST is written only when the whole conversion succeeded: everything goes to a temporary folder beside it,
which is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from .hub import resolve_pipeline_dir
from .loading import detect_format, export_diffusers, load_components, save_components
from .mapping import ConversionError

DTYPES = ("float32", "float16", "bfloat16")
VARIANT_DEFAULT_DTYPE = {"fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv=None, prog: str = "python -m convert") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert aMUSEd checkpoints: published diffusers folders or hub ids, open-muse checkpoints and "
        "our own format, into our format or back into a diffusers pipeline folder.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="a diffusers pipeline folder, a hub id, an open-muse checkpoint folder, or one of ours",
    )
    p.add_argument("dst", metavar="DST", help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--to", choices=("ours", "diffusers"), default="ours", help="output format (default: ours)")
    p.add_argument(
        "--variant",
        default=None,
        help="weight-file variant on the diffusers side: read SRC's *.VARIANT.safetensors, and with "
        "--to diffusers write DST's files under that variant (e.g. fp16)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="precision of the written weights (default: float16 with --variant fp16, bfloat16 with "
        "--variant bf16, otherwise float32)",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) when SRC is a hub id")
    p.add_argument(
        "--overwrite", action="store_true", help="replace DST if it exists (only once the new one is complete)"
    )
    return p.parse_args(argv)


def main(argv=None, prog: str = "python -m convert") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    dst = Path(args.dst).expanduser().absolute()
    problem = overlap(args.src, dst)
    if problem:
        print(f"error: {problem}; write the conversion to another folder", file=sys.stderr)
        return 2
    clean_stale(dst)  # first: it may put back a DST a killed conversion had moved aside
    if dst.exists() and not args.overwrite:
        print(f"error: {dst} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None  # `kill` cleans up as Ctrl-C
    try:
        return convert(args, dst)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def overlap(src: str, dst: Path) -> str | None:
    """Why DST may not be written for this SRC (None if it may): DST is SRC, or one holds the other, so writing or
    replacing DST would destroy the source while it is read."""
    source = Path(src).expanduser()
    if not source.exists():
        return None  # a hub id (the cache is not a place anyone converts into)
    source, target = source.resolve(), dst.resolve()
    if source == target:
        return f"DST {dst} is SRC"
    if target in source.parents:
        return f"DST {dst} holds SRC {src}"
    if source in target.parents:
        return f"DST {dst} is inside SRC {src}"
    return None


def _partial_pattern(dst: Path) -> re.Pattern:
    """The names of the temporary folders of conversions into `dst`: `.DST.<pid>.<random>.partial` (and, from
    versions without the pid, `.DST.<random>.partial`), and `.DST.old-<pid>` (the old DST while it is replaced)."""
    name = re.escape(dst.name)
    return re.compile(rf"\.{name}\.(?:(?P<pid>\d+)\.)?[a-z0-9_]+\.partial|\.{name}\.old-(?P<old>\d+)")


def clean_stale(dst: Path) -> None:
    """Tidy up after conversions into `dst` that were killed (SIGKILL, the OOM killer, a power cut: nothing of
    theirs could run): remove their temporary folders, and put back an old DST that one of them had moved aside
    to replace it. Folders of conversions still running (their process is alive) are left alone. Done at the start
    of the next conversion to the same DST, because no handler runs in a killed process."""
    if not dst.parent.is_dir():
        return
    pattern = _partial_pattern(dst)
    for path in sorted(dst.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        pid = match.group("pid") or match.group("old")
        if pid is not None and _alive(int(pid)):
            continue
        if match.group("old") is not None and not dst.exists():
            os.replace(path, dst)  # the replacement never arrived: the old DST is still the current one
            logging.warning("restored %s, left aside by a conversion that was killed", dst)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logging.warning("removed %s, left by a conversion that was killed", path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert(args: argparse.Namespace, dst: Path) -> int:
    dtype_name = args.dtype or VARIANT_DEFAULT_DTYPE.get(args.variant, "float32")
    dtype = getattr(torch, dtype_name)
    steps = ["transformer", "vqvae", "text_encoder", "tokenizer", "scheduler", "write"]
    bar = tqdm(total=len(steps), desc="resolving", unit="step", file=sys.stderr)
    tmp = None
    try:
        folder = resolve_pipeline_dir(args.src, variant=args.variant, revision=args.revision)
        kind = detect_format(folder)
        read_variant = args.variant if kind == "diffusers" else None

        started = []

        def progress(name: str) -> None:  # called as each component starts loading
            if started:
                bar.update(1)
            started.append(name)
            bar.set_description(f"loading {name}")

        components = load_components(str(folder), dtype=dtype, variant=read_variant, progress=progress)
        components.source = args.src
        bar.update(1)
        bar.set_description(f"writing {args.to}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=".partial", dir=dst.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; DST gets the permissions of an ordinary folder
        if args.to == "ours":
            written = save_components(components, tmp)
        else:
            written = export_diffusers(components, tmp, variant=args.variant)
        written = [Path(w).relative_to(tmp) for w in written]
        bar.update(1)
        bar.set_description("done")
        _replace(tmp, dst)
        tmp = None
    except (ConversionError, OSError, ValueError) as e:
        bar.close()
        print(f"error: {e}\n{dst} was not written.", file=sys.stderr)
        return 1
    finally:
        bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(summary(components, args, kind, dtype_name, dst, [dst / w for w in written]))
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an existing `dst` is removed only after the new one is in place."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def summary(components, args, kind: str, dtype_name: str, dst: Path, written: list[Path]) -> str:
    params = components.num_parameters()
    variant = f", {args.variant} variant" if args.variant and kind == "diffusers" else ""
    lines = [
        f"converted {args.src} ({kind}{variant}) -> {dst} ({args.to}"
        + (f", {args.variant} variant" if args.to == "diffusers" and args.variant else "")
        + ")",
        "",
    ]
    lines.append(f"  {'component':<14}{'class':<30}{'parameters':>14}  dtype")
    for name, module in components.modules().items():
        dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
        lines.append(f"  {name:<14}{type(module).__name__:<30}{params[name]:>14,}  {dtype}")
    lines.append(f"  {'total':<44}{sum(params.values()):>14,}")
    tok = components.tokenizer
    lines.append(
        f"  {'tokenizer':<14}{type(tok).__name__:<30}  vocab {len(tok):,}, pads with {tok.pad_token} to {tok.model_max_length}"
    )
    sc = components.scheduler_config
    lines.append(f"  {'scheduler':<14}mask id {sc['mask_token_id']}, {sc['masking_schedule']} schedule")
    total = sum(p.stat().st_size for p in written)
    lines += ["", f"files written ({len(written)}, {_size(total)}):"]
    lines += [f"  {p.relative_to(dst)}  {_size(p.stat().st_size)}" for p in written]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
