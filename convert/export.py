"""Ours -> a diffusers AmusedPipeline folder, in the published layout, so a model fine-tuned
here loads in diffusers unchanged: `AmusedPipeline.from_pretrained(DIR)` (with `variant=` when one was written).

Written without importing diffusers: the configs are the JSON diffusers itself writes, the weights safetensors with
diffusers' (or transformers') tensor names."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .components import Components
from .networks import DIFFUSERS_VERSION, uvit_to_diffusers, vqgan_to_diffusers
from .safe_load import write_json
from .text_encoder import text_encoder_config, text_encoder_state_dict

# a variant that names a precision holds weights of that precision
VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

MODEL_INDEX = {
    "_class_name": "AmusedPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "AmusedScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "UVit2DModel"],
    "vqvae": ["diffusers", "VQModel"],
}


def weights_name(stem: str, variant: str | None) -> str:
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def export_pipeline(components: Components, directory: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """Write a diffusers pipeline folder; returns the files written. With `variant` ("fp16", ...) the weight files
    carry the variant in their names, and are cast to the precision the variant names."""
    components.check_complete(f"export to {directory}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    cast = VARIANT_DTYPES.get(variant) if variant else None
    written = [write_json(root / "model_index.json", MODEL_INDEX)]

    for name, (config, state_dict) in (
        ("transformer", uvit_to_diffusers(components.transformer)),
        ("vqvae", vqgan_to_diffusers(components.vqvae)),
    ):
        d = root / name
        d.mkdir(exist_ok=True)
        written.append(write_json(d / "config.json", config))
        written.append(_save(state_dict, d / weights_name("diffusion_pytorch_model", variant), cast))

    d = root / "text_encoder"
    d.mkdir(exist_ok=True)
    config = text_encoder_config(components.text_encoder)
    if cast is not None:
        config["dtype"] = str(cast).removeprefix("torch.")
    written.append(write_json(d / "config.json", config))
    written.append(_save(text_encoder_state_dict(components.text_encoder), d / weights_name("model", variant), cast))

    d = root / "tokenizer"
    d.mkdir(exist_ok=True)
    written += [Path(p) for p in components.tokenizer.save_pretrained(str(d)) if Path(p).is_file()]

    d = root / "scheduler"
    d.mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "AmusedScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **components.scheduler_config,
    }
    written.append(write_json(d / "scheduler_config.json", scheduler))
    return written


def _save(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> Path:
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers refuses files without format=pt
    return path
