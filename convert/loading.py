"""One door in: `load_components(path_or_id)` for every format a user may hold.

Formats, recognised by a marker file at the top of the folder:

| format | marker | loaded by |
|---|---|---|
| published diffusers pipeline (amused/amused-256, -512, or any `save_pretrained` of one) | `model_index.json` | `load_published` here |
| ours (`save_components`) | `muse.json` | `convert.ours.load_ours` |
| open-muse original checkpoints | `transformer/config.json` naming `MaskGiTUViT`/`MaskGiTUViT_v2` | `convert.open_muse.load_open_muse` |

A hub id (`owner/name`) is fetched into, or found in, the local hub cache first (`convert.hub`). Weights are read
memory-mapped from safetensors (or through the weights-only unpickler) into modules built on the meta device, so
nothing is initialised randomly and then overwritten. `diffusers` is never imported.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from uvit import UViTConfig
from vqgan import VQGANConfig

from .components import Components, check_scheduler_config, default_scheduler_config
from .export import export_pipeline
from .hub import resolve_pipeline_dir
from .mapping import ConversionError, WeightValueError
from .meta_init import skip_meta_init
from .networks import uvit_from_diffusers, vqgan_from_diffusers
from .open_muse import is_open_muse_folder, load_open_muse
from .ours import load_ours, save_ours
from .safe_load import CheckpointError, check_stored_dtype, read_json, read_sharded_safetensors, read_weights
from .text_encoder import load_text_encoder, load_tokenizer

log = logging.getLogger(__name__)

# the dtype every float tensor of a weight-file variant is stored in
VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINE_CLASSES = ("AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline")
OURS_MARKER = "muse.json"
DIFFUSERS_MARKER = "model_index.json"

__all__ = ["Components", "load_components", "save_components", "export_diffusers", "detect_format", "load_published"]


# --- finding weight files ------------------------------------------------------------------------------------------


def find_weights(folder: Path, stems: Iterable[str], variant: str | None = None) -> Path:
    """The weights file of one component folder: `{stem}[.{variant}].safetensors`, its sharded index, or a
    weights-only `.bin`. Raises CheckpointError naming the folder and what was looked for."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder is missing")
    tag = f".{variant}" if variant else ""
    names = []
    for stem in stems:
        names += [f"{stem}{tag}.safetensors", f"{stem}{tag}.safetensors.index.json"]
        if variant:  # diffusers' current name for a variant's shard index
            names.append(f"{stem}.safetensors.index.{variant}.json")
    names += [f"{stem}{tag}.bin" for stem in stems]
    tried = []
    for name in names:
        tried.append(name)
        if (folder / name).is_file():
            return folder / name
    present = sorted(
        p.name for p in folder.iterdir() if p.is_file() and (".safetensors" in p.name or p.suffix == ".bin")
    )
    hint = ""
    if variant and present:
        hint = f"; it holds {present}: load without the {variant!r} variant"
    elif not variant and present:
        hint = f"; it holds {present}: load with the matching variant (e.g. variant='fp16')"
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(tried)}){hint}")


def read_component_weights(path: Path) -> dict[str, torch.Tensor]:
    if ".safetensors.index" in path.name:
        return read_sharded_safetensors(path)
    return read_weights(path)


# --- published (diffusers) pipeline folders ------------------------------------------------------------------------


def _check_class(config: dict, path: Path, expected: str | tuple[str, ...]) -> None:
    expected = (expected,) if isinstance(expected, str) else expected
    name = config.get("_class_name")
    if name is not None and name not in expected:
        raise CheckpointError(f"{path}: config is for a {name}, expected {' or '.join(expected)}")


def _network_from_folder(folder: Path, variant, dtype, stems, class_name, build: Callable, config_cls, what: str):
    config_path = folder / "config.json"
    config = read_json(config_path, f"{what} config")
    _check_class(config, config_path, class_name)
    try:
        config_cls.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid {what} config ({e})") from None
    weights = find_weights(folder, stems, variant)
    state_dict = read_component_weights(weights)
    check_stored_dtype(state_dict, weights, VARIANT_DTYPES.get(variant))
    try:
        with skip_meta_init():  # `build` constructs on the meta device; skip the random init it would discard
            return build(config, state_dict, dtype=dtype)
    except WeightValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    except ConversionError as e:
        raise CheckpointError(f"{weights}: does not match {config_path}: {e}") from None


def load_published(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    progress=None,
    networks=Components.MODULES,
) -> Components:
    """A diffusers aMUSEd pipeline folder (model_index.json + one folder per component) -> our Components; only the
    `networks` named are loaded (the others are None)."""
    folder = Path(folder)
    index_path = folder / DIFFUSERS_MARKER
    index = read_json(index_path, "pipeline index")
    _check_class(index, index_path, PIPELINE_CLASSES)
    for name in ("transformer", "vqvae", "text_encoder"):
        if not (folder / name).is_dir():
            raise CheckpointError(
                f"{folder}: the {name}/ component folder is missing (a published aMUSEd pipeline has "
                "transformer/, vqvae/, text_encoder/, tokenizer/ and scheduler/)"
            )
    step = progress or (lambda name: None)

    transformer = vqvae = text_encoder = None
    if "transformer" in networks:
        step("transformer")
        transformer = _network_from_folder(
            folder / "transformer",
            variant,
            dtype,
            ("diffusion_pytorch_model",),
            "UVit2DModel",
            uvit_from_diffusers,
            UViTConfig,
            "U-ViT",
        )
    if "vqvae" in networks:
        step("vqvae")
        vqvae = _network_from_folder(
            folder / "vqvae",
            variant,
            dtype,
            ("diffusion_pytorch_model",),
            "VQModel",
            vqgan_from_diffusers,
            VQGANConfig,
            "VQ-GAN",
        )
    if "text_encoder" in networks:
        step("text_encoder")
        te_folder = folder / "text_encoder"
        te_weights = find_weights(te_folder, ("model", "pytorch_model"), variant)
        te_state = read_component_weights(te_weights)
        check_stored_dtype(te_state, te_weights, VARIANT_DTYPES.get(variant))
        text_encoder = load_text_encoder(te_folder, te_state, te_weights, dtype)
    step("tokenizer")
    tokenizer = load_tokenizer(folder / "tokenizer" if (folder / "tokenizer").is_dir() else None)
    step("scheduler")
    scheduler = {}  # checked against the transformer's config: read when the transformer is loaded
    if transformer is not None:
        scheduler = scheduler_config_from(folder / "scheduler" / "scheduler_config.json", transformer.config)
    return Components(transformer, vqvae, text_encoder, tokenizer, scheduler, source=str(folder))


def scheduler_config_from(path: Path, uvit_config: UViTConfig) -> dict:
    """{"mask_token_id", "masking_schedule"} from a scheduler config file, checked against the transformer."""
    if not path.is_file():
        log.info(
            "%s missing: using mask id %d (vocab_size - 1) and the cosine schedule", path, uvit_config.mask_token_id
        )
        return default_scheduler_config(uvit_config.mask_token_id)
    raw = read_json(path, "scheduler config")
    _check_class(raw, path, "AmusedScheduler")
    config = default_scheduler_config(raw.get("mask_token_id", uvit_config.mask_token_id))
    config["masking_schedule"] = raw.get("masking_schedule", "cosine")
    return check_scheduler_config(config, uvit_config, path)


# --- the door ------------------------------------------------------------------------------------------------------


def detect_format(folder: Path) -> str:
    """'ours', 'diffusers' or 'open-muse', from the folder's marker files."""
    if (folder / OURS_MARKER).is_file():
        return "ours"
    if (folder / DIFFUSERS_MARKER).is_file():
        return "diffusers"
    if is_open_muse_folder(folder):
        return "open-muse"
    found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: not a checkpoint folder this loader knows: expected {DIFFUSERS_MARKER} (a published diffusers "
        f"pipeline), {OURS_MARKER} (ours) or transformer/config.json naming an open-muse MaskGiTUViT; found {found}"
    )


def load_components(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device=None,
    variant: str | None = None,
    *,
    revision: str | None = None,
    progress: Callable[[str], None] | None = None,
    networks: Iterable[str] = Components.MODULES,
) -> Components:
    """Load an aMUSEd pipeline from a published diffusers folder, one of ours, an open-muse checkpoint folder, or a
    hub id (fetched into / found in the local hub cache). `dtype` (default float32) applies to all three networks;
    `variant` picks the variant weight files (e.g. "fp16") of a diffusers folder; `progress(name)` is called before
    each component loads. `networks` names those to load (default all three of Components.MODULES); the others
    are None, and the scheduler config is read only with the transformer (training loads the encoders, pre-encodes
    and frees them before the U-ViT, so the three are never in memory together)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    networks = tuple(networks)
    unknown = sorted(set(networks) - set(Components.MODULES))
    if unknown or not networks:
        raise ValueError(f"networks must name some of {Components.MODULES}, got {networks!r}")
    dtype = dtype or torch.float32
    folder = resolve_pipeline_dir(path_or_id, variant=variant, revision=revision)
    kind = detect_format(folder)
    with _gc_paused():
        components = _load_folder(folder, kind, dtype, variant, progress, networks)
    components.source = str(path_or_id)
    if device is not None:
        components.to(device)
    return components


@contextlib.contextmanager
def _gc_paused():
    """Loading creates some 10^5 short-lived Python objects (modules, parameters, safetensors views) and no reference
    cycles worth collecting; left on, the cyclic collector runs full passes over them midway, a sizeable share of
    the load time. Paused here, collected as usual after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_folder(folder: Path, kind: str, dtype: torch.dtype, variant: str | None, progress, networks) -> Components:
    if kind == "diffusers":
        return load_published(folder, dtype, variant, progress, networks)
    if kind == "ours":
        if variant:
            log.warning("%s: our format has no weight variants; ignoring variant=%r", folder, variant)
        return load_ours(folder, dtype, progress, networks)
    return load_open_muse(folder, dtype, variant, progress, networks)


def save_components(components: Components, directory: str | os.PathLike) -> list[Path]:
    """Write `components` in our format (see `convert.ours`); returns the files written."""
    return save_ours(components, directory)


def export_diffusers(components: Components, directory: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """Write `components` as a diffusers AmusedPipeline folder (see `convert.export`); returns the files written."""
    return export_pipeline(components, directory, variant)
