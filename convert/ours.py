"""Our checkpoint format: one folder, a safetensors file and a readable JSON config per component.

    DIR/
      muse.json                      what this is: format, version, components, dtype, parameter counts, source
      transformer/config.json        UViTConfig fields           transformer/model.safetensors   (our names)
      vqvae/config.json              VQGANConfig fields          vqvae/model.safetensors         (our names)
      text_encoder/config.json       transformers CLIPTextConfig text_encoder/model.safetensors  (transformers names)
      tokenizer/                     the tokenizer's own save_pretrained files
      scheduler/config.json          {"mask_token_id", "masking_schedule"}

Loading needs torch, safetensors and transformers (the text encoder's class); never diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from uvit import UViT, UViTConfig
from vqgan import VQGAN, VQGANConfig

from .components import Components, check_scheduler_config
from .mapping import KeyMap, WeightValueError, to_ours
from .meta_init import empty_modules
from .safe_load import CheckpointError, check_stored_dtype, read_json, read_safetensors, write_json
from .text_encoder import load_text_encoder, load_tokenizer, text_encoder_config, text_encoder_state_dict

FORMAT = "muse"
FORMAT_VERSION = 1
MARKER = "muse.json"
WEIGHTS = "model.safetensors"
IDENTITY = KeyMap(rules=[])  # our names on both sides: the same checks (missing, unexpected, shapes) as a conversion

NETWORKS = {  # component -> (model class, config class)
    "transformer": (UViT, UViTConfig),
    "vqvae": (VQGAN, VQGANConfig),
}


def save_ours(components: Components, directory: str | os.PathLike) -> list[Path]:
    """Write `components` into `directory` (created; existing files of the same names are replaced)."""
    components.check_complete(f"save to {directory}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in NETWORKS:
        model = getattr(components, name)
        d = root / name
        d.mkdir(exist_ok=True)
        config = {"_class": f"{type(model).__module__.split('.')[0]}.{type(model).__name__}", **model.config.to_dict()}
        written.append(write_json(d / "config.json", config))
        written.append(_save_tensors(model.state_dict(), d / WEIGHTS, name))
    d = root / "text_encoder"
    d.mkdir(exist_ok=True)
    written.append(write_json(d / "config.json", text_encoder_config(components.text_encoder)))
    written.append(_save_tensors(text_encoder_state_dict(components.text_encoder), d / WEIGHTS, "text_encoder"))
    written += _save_tokenizer(components.tokenizer, root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    written.append(write_json(root / "scheduler" / "config.json", dict(components.scheduler_config)))
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "components": ["transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"],
        "dtype": {k: str(v).removeprefix("torch.") for k, v in components.dtypes().items()},
        "parameters": components.num_parameters(),
        "source": components.source,
    }
    written.append(write_json(root / MARKER, index))  # last: a folder without it is not a complete checkpoint
    return written


def _save_tensors(state_dict: dict[str, torch.Tensor], path: Path, component: str) -> Path:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "muse_format": FORMAT, "component": component})
    return path


def _save_tokenizer(tokenizer, directory: Path) -> list[Path]:
    directory.mkdir(exist_ok=True)
    return [Path(p) for p in tokenizer.save_pretrained(str(directory)) if Path(p).is_file()]


def load_ours(
    folder: str | Path, dtype: torch.dtype | None = None, progress=None, networks=Components.MODULES
) -> Components:
    """Our folder -> Components; only the `networks` named are loaded (the others are None)."""
    root = Path(folder)
    index = read_json(root / MARKER, "muse index")
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{root / MARKER}: format is {index.get('format')!r}, expected {FORMAT!r}")
    if int(index.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{root / MARKER}: format_version {index['format_version']} is newer than this code reads ({FORMAT_VERSION}); update muse"
        )
    step = progress or (lambda name: None)
    declared = _declared_dtypes(index, root / MARKER)
    loaded = dict.fromkeys(Components.MODULES)
    for name, (model_cls, config_cls) in NETWORKS.items():
        if name in networks:
            step(name)
            loaded[name] = load_network(root / name, model_cls, config_cls, dtype, declared.get(name))
    if "text_encoder" in networks:
        step("text_encoder")
        te_weights = root / "text_encoder" / WEIGHTS
        te_state = read_safetensors(te_weights)
        check_stored_dtype(te_state, te_weights, declared.get("text_encoder"))
        loaded["text_encoder"] = load_text_encoder(root / "text_encoder", te_state, te_weights, dtype)
    step("tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer" if (root / "tokenizer").is_dir() else None)
    step("scheduler")
    sched_path = root / "scheduler" / "config.json"
    scheduler = {}  # checked against the transformer's config: read when the transformer is loaded
    if loaded["transformer"] is not None:
        scheduler = check_scheduler_config(
            read_json(sched_path, "scheduler config"), loaded["transformer"].config, sched_path
        )
    return Components(**loaded, tokenizer=tokenizer, scheduler_config=scheduler, source=str(root))


def _declared_dtypes(index: dict, path: Path) -> dict[str, torch.dtype]:
    """component -> the dtype muse.json says its weights are stored in (components it does not name: unchecked)."""
    declared = index.get("dtype") or {}
    if not isinstance(declared, dict):
        raise CheckpointError(f"{path}: 'dtype' must map components to dtype names, got {declared!r}")
    out = {}
    for name, value in declared.items():
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(
                f"{path}: dtype of {name} is {value!r}, not a float dtype name (float32, float16, bfloat16)"
            )
        out[name] = dtype
    return out


def load_network(
    folder: Path, model_cls, config_cls, dtype: torch.dtype | None = None, declared: torch.dtype | None = None
):
    """One of our networks from `folder/config.json` + `folder/model.safetensors`, built on the meta device;
    `declared` is the dtype muse.json says the weights are stored in."""
    config_path, weights = folder / "config.json", folder / WEIGHTS
    raw = read_json(config_path, f"{model_cls.__name__} config")
    try:
        config = config_cls.from_dict(raw, strict=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid {model_cls.__name__} config ({e})") from None
    state_dict = read_safetensors(weights)
    check_stored_dtype(state_dict, weights, declared)
    with empty_modules():
        model = model_cls(config)
    try:
        return to_ours(model, IDENTITY, state_dict, what=str(weights), dtype=dtype).eval()
    except CheckpointError:
        raise
    except WeightValueError as e:  # its message starts with the file
        raise CheckpointError(str(e)) from None
    except ValueError as e:  # ConversionError
        raise CheckpointError(f"{weights}: does not match {config_path}: {e}") from None
