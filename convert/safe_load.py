"""Reading checkpoint files without trusting them.

* safetensors: the header is checked first (size, JSON, every tensor's byte range inside the file), so a truncated
  or corrupt file is reported as such, with its path, instead of as a Rust panic or a short read; the tensors are
  then memory-mapped, not copied.
* pickles (`pytorch_model.bin`, open-muse's format): only `torch.load(weights_only=True)`, which refuses any pickle
  that would import or call code. Never a plain `torch.load`.
* JSON configs: a missing or malformed file names itself.

Every failure raises `CheckpointError`, whose message starts with the offending file.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .mapping import ConversionError

# safetensors dtype tags -> bytes per element (the formats torch can read)
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class CheckpointError(ConversionError):
    """A checkpoint file or folder that cannot be loaded: the message names the file and the problem."""


def read_json(path: str | Path, what: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} file is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} file must hold a JSON object, got {type(value).__name__}")
    return value


def write_json(path: str | Path, value: Mapping) -> Path:
    path = Path(path)
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def safetensors_header(path: str | Path) -> dict:
    """The parsed header of a safetensors file, after checking it describes bytes the file actually holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, truncated or empty)")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, the file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors file (bad header entry for tensor {name!r})") from None
        numel = 1
        for s in shape:
            numel *= int(s)
        if dtype not in _DTYPE_SIZES or stop - begin != numel * _DTYPE_SIZES[dtype] or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors file (tensor {name!r}: {dtype} {shape} at [{begin}, {stop}))"
            )
        end = max(end, stop)
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (its tensors need {end} data bytes, the file holds {data_size}); "
            "download or copy it again"
        )
    return header


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, memory-mapped (no copy until a tensor is cast or moved)."""
    path = Path(path)
    safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def check_stored_dtype(tensors: Mapping[str, torch.Tensor], path: str | Path, declared: torch.dtype | None) -> None:
    """Every float tensor of a file whose variant (or index) declares a dtype must be stored in that dtype: an fp16
    variant holding bfloat16 (or float32) tensors was mislabelled or its header rewritten."""
    if declared is None:
        return
    wrong = [
        f"{k}: {str(t.dtype).removeprefix('torch.')}"
        for k, t in tensors.items()
        if t.is_floating_point() and t.dtype != declared
    ]
    if wrong:
        shown = ", ".join(wrong[:5]) + (f", ... ({len(wrong) - 5} more)" if len(wrong) > 5 else "")
        name = str(declared).removeprefix("torch.")
        raise CheckpointError(
            f"{path}: declared {name}, but {len(wrong)} float tensor(s) are stored otherwise: {shown}"
        )


def read_pickled_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin`-style state dict, through the weights-only unpickler: a file whose unpickling would
    import or call anything but plain tensors and containers is refused before any of it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than plain tensors, and unpickling them could "
            f"run code ({first}). Only weights-only checkpoints are accepted; re-save it as a plain state dict "
            "(or as safetensors) from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint, corrupt or truncated ({e})") from None
    return _as_state_dict(value, path)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a weights-only pickle (`.bin`, `.pt`, `.pth`, `.ckpt`)."""
    path = Path(path)
    return read_safetensors(path) if path.suffix == ".safetensors" else read_pickled_weights(path)


def read_sharded_safetensors(index_path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict split over several safetensors files listed by a `*.safetensors.index.json`."""
    index_path = Path(index_path)
    index = read_json(index_path, "weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: weights index has no 'weight_map'")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(index_path.parent / shard)
        out.update(tensors)
    missing = sorted(k for k in weight_map if k not in out)
    if missing:
        raise CheckpointError(
            f"{index_path}: {len(missing)} tensor(s) listed in the index are in no shard: {missing[:5]}"
        )
    return out


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _as_state_dict(value, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(value, Mapping) and not any(isinstance(v, torch.Tensor) for v in value.values()):
        # a training checkpoint that wraps the weights: {"state_dict": {...}} or {"model": {...}}
        for key in ("state_dict", "model"):
            if isinstance(value.get(key), Mapping):
                value = value[key]
                break
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(value).__name__}")
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: expected a state dict (name -> tensor); entries that are not tensors: {bad[:5]}"
        )
    return dict(value)
