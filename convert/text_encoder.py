"""The CLIP text encoder and tokenizer, loaded through `transformers` but without its slow path.

The text encoder (`CLIPTextModelWithProjection`) is built from its config on the meta device and its tensors are
assigned straight from the memory-mapped safetensors file, every name and shape checked. The one tensor the file
does not hold is the non-persistent `position_ids` buffer (0..76), which is rebuilt here.

The tokenizer loads from either form a folder may hold (`vocab.json` + `merges.txt`, or the `tokenizer.json` that
recent `save_pretrained` writes); without a tokenizer folder the CLIP tokenizer is rebuilt offline from the merges
bundled with open_clip (`convert.clip_tokenizer`). aMUSEd pads with the end-of-text token to 77.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .clip_tokenizer import EOS, MODEL_MAX_LENGTH, offline_clip_tokenizer
from .mapping import value_error, value_problem
from .meta_init import empty_modules
from .safe_load import CheckpointError, read_json

log = logging.getLogger(__name__)

TEXT_ENCODER_CLASS = "CLIPTextModelWithProjection"


def text_encoder_from_state_dict(
    config: Mapping,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    what: str = "text encoder",
) -> nn.Module:
    """A transformers `CLIPTextModelWithProjection` from its config dict and state dict, built on the meta device."""
    config = {k: v for k, v in dict(config).items() if k not in ("dtype", "torch_dtype")}
    archs = config.get("architectures") or [TEXT_ENCODER_CLASS]
    if TEXT_ENCODER_CLASS not in archs:
        raise CheckpointError(
            f"{what}: config names {archs}, but aMUSEd needs a {TEXT_ENCODER_CLASS} (the projected pooled output)"
        )
    try:
        cfg = CLIPTextConfig(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: invalid CLIP text config ({e})") from None
    with empty_modules():
        model = CLIPTextModelWithProjection(cfg)
    expected = model.state_dict(keep_vars=True)
    persistent = {k: v for k, v in expected.items()}
    optional = {k for k in _non_persistent_buffers(model)}  # saved by some older transformers versions
    missing = sorted(k for k in persistent if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in persistent and k not in optional)
    misshapen = [
        f"{k}: got {tuple(state_dict[k].shape)}, expected {tuple(v.shape)}"
        for k, v in persistent.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_preview(unexpected)}")
    if misshapen:
        problems.append(f"misshapen {len(misshapen)} tensor(s): {_preview(misshapen)}")
    if problems:
        raise CheckpointError(f"{what} does not fit {TEXT_ENCODER_CLASS}: " + "; ".join(problems))
    bad_values = [p for k, v in persistent.items() if (p := value_problem(k, state_dict[k], v.dtype)) is not None]
    if bad_values:
        raise CheckpointError(str(value_error(what, bad_values)))
    tensors = {
        k: (state_dict[k] if dtype is None or not state_dict[k].is_floating_point() else state_dict[k].to(dtype))
        for k in persistent
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    _rebuild_position_ids(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(
            f"{what}: tensors left unset after loading (unsupported transformers version?): {leftover}"
        )
    return model.eval()


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    out = []
    for prefix, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            out.append(f"{prefix}.{name}" if prefix else name)
    return out


def _rebuild_position_ids(model: nn.Module) -> None:
    """The position-id buffers, 0..max_positions-1 as (1, P), which state dicts do not carry."""
    for module in model.modules():
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            n = buf.shape[-1]
            module.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)


def load_text_encoder(
    folder: str | Path, state_dict: Mapping[str, torch.Tensor], weights_path: Path, dtype=None
) -> nn.Module:
    folder = Path(folder)
    config = read_json(folder / "config.json", "text encoder config")
    try:
        return text_encoder_from_state_dict(config, state_dict, dtype, what=f"{weights_path}")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (config: {folder / 'config.json'})") from None


def text_encoder_config(model: nn.Module) -> dict:
    """The JSON config of a transformers text encoder, as `save_pretrained` would write it."""
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return cfg


def text_encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of a transformers model, contiguous, ready for safetensors."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


# --- tokenizer -----------------------------------------------------------------------------------------------------

TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def has_tokenizer_files(folder: Path) -> bool:
    return any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path | None):
    """A transformers `CLIPTokenizer` that pads with <|endoftext|> to 77 (or to the shorter length the folder
    declares). `folder` may hold either file form; when it is None or holds neither, the tokenizer is rebuilt offline
    from open_clip's bundled merges."""
    folder = Path(folder) if folder is not None else None
    if folder is None or not has_tokenizer_files(folder):
        where = f"{folder} has no tokenizer files" if folder is not None else "no tokenizer folder"
        log.info("%s: building the CLIP tokenizer offline from open_clip's bundled BPE merges", where)
        tokenizer = offline_clip_tokenizer()
    else:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types for broken tokenizer files
            raise CheckpointError(f"{folder}: cannot load the CLIP tokenizer ({type(e).__name__}: {e})") from None
    return _amused_padding(tokenizer, folder)


def _amused_padding(tokenizer, folder):
    if tokenizer.pad_token != EOS:
        log.warning("%s: tokenizer pads with %r; aMUSEd pads with %r, using that", folder, tokenizer.pad_token, EOS)
        tokenizer.pad_token = EOS
    if not 1 <= tokenizer.model_max_length <= MODEL_MAX_LENGTH:
        # unset (transformers' 1e30) or longer than CLIP's positions; a shorter declared context is kept, as the
        # reference pipelines keep it (the embedded model's CPU recipe declares 16)
        log.warning(
            "%s: tokenizer model_max_length %s, aMUSEd uses %d", folder, tokenizer.model_max_length, MODEL_MAX_LENGTH
        )
        tokenizer.model_max_length = MODEL_MAX_LENGTH
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    if eos_id != 49407:
        raise CheckpointError(f"{folder}: tokenizer maps {EOS} to {eos_id}, expected 49407 (not the CLIP vocabulary?)")
    return tokenizer


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
