"""LoRA adapter files: ours and the diffusers/peft format, read and written for the layers of `uvit.lora`.

Files:
  - ours (`save_lora(..., fmt="muse")`): keys `<our module>.lora_a.weight` / `.lora_b.weight`, metadata with the
    alpha of each module;
  - peft/diffusers (`fmt="peft"`, file name `pytorch_lora_weights.safetensors`): keys
    `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (text encoder: `text_encoder.<hf module>...`),
    and the `lora_adapter_metadata` header entry (r, lora_alpha, target_modules, ...) that diffusers reads, so
    `UVit2DModel.load_lora_adapter(dir, prefix="transformer")` rebuilds the same adapter with the same scale.
  Reading accepts both, plus peft files without metadata (then alpha = rank, as diffusers assumes), kohya-style
  `<module>.alpha` entries, and `PeftModel.save_pretrained` folders (adapter_model.safetensors + adapter_config.json,
  what the reference's image-generation script loads).

Module names: the U-ViT's are mapped to diffusers' through the converter's key map (`module_namer`); a transformers
CLIP text encoder's are the same in every library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from uvit import UViT
from uvit import lora as layers
from uvit.lora import Adapter, LoRALinear, Namer, get_adapters, merge_lora, set_adapters

from .diffusers_keys import UVIT_KEYMAP
from .safe_load import read_safetensors, safetensors_header

PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MUSE_WEIGHT_NAME = "lora.safetensors"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # the safetensors header entry diffusers writes and reads
MUSE_FORMAT = "muse-lora"

# The reference's target names (diffusers attention projections) and their CLIP text-encoder equivalents: the
# reference passed to_q/to_k/to_v to the text encoder too, where no such module exists.
CLIP_ALIASES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj"}


# --- naming: our module names <-> the names diffusers/peft use for the same modules --------------------------------


def module_namer(model: nn.Module) -> Namer:
    """Our module name -> the name diffusers/peft use for it: the U-ViT through the converter's key map, anything
    else (the transformers CLIP text encoder) as is."""
    if isinstance(model, UViT):
        return lambda name: UVIT_KEYMAP.theirs(name + ".weight").removesuffix(".weight")
    return lambda name: name


def find_targets(model: nn.Module, patterns) -> list[str]:
    """`uvit.lora.find_targets` with diffusers' module names understood too (`to_q` finds our `q`)."""
    return layers.find_targets(model, patterns, module_namer(model))


def inject_lora(
    model: nn.Module,
    targets,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_dtype=torch.float32,
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """`uvit.lora.inject_lora` with diffusers' module names understood too, so the reference's targets
    (`to_q to_k to_v`) adapt the same layers as ours (`q k v`)."""
    return layers.inject_lora(model, targets, rank, alpha, dropout, adapter_dtype, aliases, namer=module_namer(model))


# --- files ------------------------------------------------------------------------------------------------------------


def to_muse_state_dict(adapters: Mapping[str, Adapter]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for name, ad in adapters.items():
        tensors[f"{name}.lora_a.weight"] = ad.a.contiguous()
        tensors[f"{name}.lora_b.weight"] = ad.b.contiguous()
    metadata = {
        "format": "pt",
        "lora_format": MUSE_FORMAT,
        "alphas": json.dumps({n: ad.alpha for n, ad in adapters.items()}),
    }
    return tensors, metadata


def to_peft_state_dict(
    adapters: Mapping[str, Adapter], namer: Callable[[str], str], prefix: str | None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Adapters -> (peft tensors under `<prefix>.<their module>.lora_A/B.weight`, LoraConfig kwargs)."""
    tensors, ranks, alphas = {}, {}, {}
    head = f"{prefix}." if prefix else ""
    for name, ad in adapters.items():
        theirs = namer(name)
        tensors[f"{head}{theirs}.lora_A.weight"] = ad.a.contiguous()
        tensors[f"{head}{theirs}.lora_B.weight"] = ad.b.contiguous()
        ranks[theirs], alphas[theirs] = ad.rank, ad.alpha
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    config = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{k}$": v for k, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{k}$": v for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
    }
    return tensors, config


def _most_common(values):
    values = list(values)
    return max(set(values), key=values.count)


def save_lora(
    model: nn.Module,
    path: str | Path,
    fmt: str = "muse",
    prefix: str = "transformer",
    extra: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Write the adapters of `model` alone as safetensors. `path` may be a directory (the standard file name of the
    format is used) or a file. fmt "peft" writes the diffusers/peft layout with `prefix` ("transformer"); `extra`
    adds other components under their own prefix (e.g. {"text_encoder": clip})."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / (PEFT_WEIGHT_NAME if fmt == "peft" else MUSE_WEIGHT_NAME)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    components = {prefix: model, **(extra or {})}
    tensors, header = {}, {"format": "pt"}
    if fmt == "peft":
        configs = {}
        for pre, module in components.items():
            adapters = get_adapters(module)
            if adapters:
                t, cfg = to_peft_state_dict(adapters, module_namer(module), pre)
                tensors.update(t)
                configs.update({f"{pre}.{k}": v for k, v in cfg.items()})
        header[PEFT_METADATA_KEY] = json.dumps(configs, indent=2, sort_keys=True)
    elif fmt == "muse":
        alphas = {}
        for pre, module in components.items():
            t, meta = to_muse_state_dict(get_adapters(module))
            tensors.update({f"{pre}.{k}": v for k, v in t.items()})
            alphas.update({f"{pre}.{k}": v for k, v in json.loads(meta["alphas"]).items()})
        header.update(lora_format=MUSE_FORMAT, alphas=json.dumps(alphas))
    else:
        raise ValueError(f"unknown LoRA file format {fmt!r} (expected 'muse' or 'peft')")
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


def _resolve_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (MUSE_WEIGHT_NAME, PEFT_WEIGHT_NAME, "adapter_model.safetensors"):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"no LoRA weights in {path} (looked for {MUSE_WEIGHT_NAME} or {PEFT_WEIGHT_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata) of a LoRA file or of the directory holding one."""
    file = _resolve_file(path)
    # the header first: a text, pickle or truncated file is refused by name before anything is read
    metadata = dict(safetensors_header(file).get("__metadata__") or {})
    tensors = read_safetensors(file)
    peft_config = file.parent / "adapter_config.json"  # a PeftModel.save_pretrained folder keeps its LoraConfig here
    if PEFT_METADATA_KEY not in metadata and peft_config.is_file():
        metadata[PEFT_METADATA_KEY] = peft_config.read_text()
    return tensors, metadata


def parse_adapters(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    model: nn.Module,
    prefix: str = "transformer",
    alpha: float | None = None,
) -> dict[str, Adapter]:
    """Adapters for `model` (keyed by our module names) from a file's tensors, in either format. Keys of other
    components (another prefix) are ignored; unknown module names raise. `alpha` overrides the file's alpha."""
    metadata = dict(metadata or {})
    is_peft = any(".lora_A." in k for k in tensors)
    if not is_peft and not any(".lora_a." in k for k in tensors):
        raise ValueError("not a LoRA file: no '.lora_A.' (peft) or '.lora_a.' (muse) keys")
    tensors = _strip_prefix(tensors, prefix)
    if not tensors:
        raise ValueError(f"the LoRA file has no adapters for the component {prefix!r}")
    if is_peft:
        return _parse_peft(tensors, metadata, model, prefix, alpha)
    alphas = json.loads(metadata.get("alphas", "{}"))
    alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items()}
    out = {}
    for key in tensors:
        if key.endswith(".lora_a.weight"):
            name = key.removesuffix(".lora_a.weight")
            b = tensors.get(f"{name}.lora_b.weight")
            if b is None:
                raise ValueError(f"LoRA file: {name} has lora_a but no lora_b")
            a = tensors[key]
            out[name] = Adapter(a, b, alpha if alpha is not None else float(alphas.get(name, a.shape[0])))
    return out


def _strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the keys of one component: `<prefix>.xxx` -> `xxx`. Files without any component prefix are all kept."""
    known = ("transformer.", "text_encoder.", "unet.")
    if not any(k.startswith(known) for k in tensors):
        return dict(tensors)
    return {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def _parse_peft(tensors, metadata, model, prefix, alpha_override) -> dict[str, Adapter]:
    config = {}
    if PEFT_METADATA_KEY in metadata:
        raw = json.loads(metadata[PEFT_METADATA_KEY])
        config = {k.removeprefix(f"{prefix}."): v for k, v in raw.items() if k.startswith(f"{prefix}.")} or raw
    namer = module_namer(model)
    ours_of = {namer(n): n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    out, unknown = {}, []
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        theirs = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")  # PeftModel files wrap names
        theirs = re.sub(r"\.(default|default_0)$", "", theirs)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"LoRA file: {theirs} has lora_A but no lora_B")
        if theirs not in ours_of:
            unknown.append(theirs)
            continue
        a = tensors[key]
        alpha = alpha_override
        if alpha is None:
            alpha = _peft_alpha(theirs, a.shape[0], config, tensors)
        out[ours_of[theirs]] = Adapter(a, b, float(alpha))
    if unknown:
        raise ValueError(
            f"LoRA file names {len(unknown)} module(s) that {type(model).__name__} does not have: {unknown[:5]}"
        )
    return out


def _peft_alpha(theirs: str, rank: int, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> float:
    """The scale numerator of one module: kohya `.alpha` entry, else the LoraConfig (alpha_pattern, lora_alpha),
    else the rank (what diffusers assumes when a file carries no alpha: scale 1)."""
    if f"{theirs}.alpha" in tensors:
        return float(tensors[f"{theirs}.alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, theirs) or theirs.endswith(pattern.strip("^$")):
            return float(value)
    if "lora_alpha" in config:
        return float(config["lora_alpha"])
    return float(rank)


def load_lora_into(
    model: nn.Module,
    path_or_tensors: str | Path | Mapping[str, torch.Tensor],
    prefix: str = "transformer",
    alpha: float | None = None,
    merge: bool = False,
) -> list[str]:
    """Load a LoRA adapter (our format or peft/diffusers, a file or its directory, or a tensor dict) into `model`
    (a UViT, or a text encoder with prefix="text_encoder"). With `merge`, the update is folded into the base
    weights (fast inference; `unmerge_lora` takes it out again). Returns the adapted module names."""
    if isinstance(path_or_tensors, Mapping):
        tensors, metadata, source = dict(path_or_tensors), {}, "the LoRA tensors"
    else:
        tensors, metadata = read_lora_file(path_or_tensors)
        source = str(path_or_tensors)
    try:
        adapters = parse_adapters(tensors, metadata, model, prefix, alpha)
        names = set_adapters(model, adapters)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if merge:
        merge_lora(model)
    return names
