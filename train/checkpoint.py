"""Checkpoints that are complete or absent: written into a temporary folder, renamed into place at the end.

Layout of `<output_dir>/checkpoint-<step>/`:
    model.safetensors          the trained weights: the full U-ViT (our names), or its LoRA adapters (our format)
    text_encoder.safetensors   when the text encoder is trained (full weights or adapters)
    ema.safetensors            the EMA shadow, when on
    optimizer.pt               optimizer state (torch.save; read back with weights_only=True)
    trainer_state.pt           lr schedule, grad scaler, RNG states, step, data position
    rng-rank<r>.pt             each process's torch RNG states (DDP)
    state.json                 step and data position, human-readable; written last

A save goes to `<output_dir>/.tmp-checkpoint-<step>-<nonce>/` and is renamed to `checkpoint-<step>` only when every
file is written and synced; the rename is atomic, so a crash at any point leaves either the whole checkpoint or a
temporary folder that `latest` never picks (and the next save removes).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from muse import files
from muse.files import write_error

log = logging.getLogger(__name__)

NAME = re.compile(r"checkpoint-(\d+)")
TMP_PREFIX = ".tmp-checkpoint-"
DONE_FILE = "state.json"


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under `output_dir`, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / DONE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve(output_dir: str | Path, spec: str | None) -> Path | None:
    """`--resume_from_checkpoint` value -> a checkpoint folder: "latest" (None if there is none yet: a fresh start,
    as the reference), a folder path, or a name under output_dir. A named checkpoint that is missing or incomplete
    raises."""
    if not spec:
        return None
    if spec == "latest":
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(spec)
    if not path.exists() and (Path(output_dir) / spec).exists():
        path = Path(output_dir) / spec
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {spec} does not exist")
    if not (path / DONE_FILE).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {DONE_FILE}); it was not written to the end")
    return path


def read_state(path: Path) -> dict:
    """A checkpoint's state.json: step, data position, seed and the run's settings. A corrupt one names itself."""
    file = path / DONE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the checkpoint's state ({e})") from None
    if not isinstance(state, dict) or not {"step", "position"} <= set(state):
        raise ValueError(f"{file}: not a checkpoint state (it needs 'step' and 'position')")
    return state


def saved_seed(path: Path | None) -> int | None:
    """The seed a checkpoint's run used (None without a checkpoint)."""
    if path is None:
        return None
    return read_state(path).get("seed")


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (stale temporary folders of crashed saves are removed)."""
    d = Path(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = d / f"{TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, state: dict, limit: int | None = None) -> Path:
    """Write state.json, sync everything, rename `tmp` to checkpoint-<step>, then keep at most `limit` checkpoints."""
    try:
        (tmp / DONE_FILE).write_text(json.dumps(state, indent=2))
    except OSError as e:
        raise write_error(e, tmp / DONE_FILE) from e
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = tmp.parent / f"checkpoint-{step}"
    if final.exists():  # the same step saved before (e.g. the last periodic save = the final one): replace it
        old = tmp.parent / f"{TMP_PREFIX}old-{step}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(tmp.parent)
    if limit is not None:
        prune(tmp.parent, limit)
    return final


def prune(output_dir: str | Path, limit: int) -> None:
    found = checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - limit)]:
        log.info("removing old checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
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


def save_torch(obj, path: Path) -> None:
    """torch.save, with a failed write (a full disk) reported as such, naming the file."""
    files.save_torch(obj, path)


def load_torch(path: Path):
    """Read a .pt file of this module without unpickling code (weights_only); a missing or corrupt one names itself."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the checkpoint lacks this file; it is incomplete") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read this checkpoint file, corrupt or truncated ({e})") from None


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA) in a form weights_only loading accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].copy()),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
