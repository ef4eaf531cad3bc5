"""LoRA: low-rank adapters on frozen Linear layers, and their files in our format and in the diffusers/peft format.

    y = x W^T (+ b)  +  (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank), B starts at zero

`LoRALinear` keeps the frozen base weight where the replaced `nn.Linear` kept it (`<module>.weight`), so the base
model's state dict, its key map to diffusers and its checkpoints are unchanged by injection; the adapter adds
`<module>.lora_a.weight` and `<module>.lora_b.weight`.

Targets are chosen by module name. A pattern matches a Linear whose name equals it, ends with `.<pattern>`, or
fully matches it as a regex; for the U-ViT the pattern is tried on both our names (`layers.3.attn.q`) and the
diffusers names (`transformer_layers.3.attn1.to_q`), so the reference's `to_q to_k to_v` and our `q k v` pick the
same 22 x 2 x 3 + 6 x 2 x 3 layers of amused-256.

Files:
  - ours (`save_lora(..., fmt="muse")`): keys `<our module>.lora_a.weight` / `.lora_b.weight`, metadata with the
    alpha of each module;
  - peft/diffusers (`fmt="peft"`, file name `pytorch_lora_weights.safetensors`): keys
    `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (text encoder: `text_encoder.<hf module>...`),
    and the `lora_adapter_metadata` header entry (r, lora_alpha, target_modules, ...) that diffusers reads, so
    `UVit2DModel.load_lora_adapter(dir, prefix="transformer")` rebuilds the same adapter with the same scale.
  Reading accepts both, plus peft files without metadata (then alpha = rank, as diffusers assumes), kohya-style
  `<module>.alpha` entries, and `PeftModel.save_pretrained` folders (adapter_model.safetensors + adapter_config.json,
  what the reference's generate_images.py loads).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MUSE_WEIGHT_NAME = "lora.safetensors"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # the safetensors header entry diffusers writes and reads
MUSE_FORMAT = "muse-lora"

# The reference's target names (diffusers attention projections) and their CLIP text-encoder equivalents: the
# reference passed to_q/to_k/to_v to the text encoder too, where no such module exists.
CLIP_ALIASES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj"}


class LoRALinear(nn.Module):
    """A Linear layer with a frozen base weight and a trainable low-rank update (torchtune style)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        device=None,
        dtype=None,
        adapter_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        adapter_dtype = adapter_dtype or dtype
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=adapter_dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.merged = False  # the update is folded into `weight`
        self.disabled = False  # the adapter path is skipped (the base model's output)
        self.reset_adapter()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, adapter_dtype=torch.float32) -> "LoRALinear":
        """Wrap an existing Linear: its weight (and bias) become the frozen base, shared, not copied."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None)
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        dev = linear.weight.device
        layer.lora_a = nn.Linear(linear.in_features, rank, bias=False, device=dev, dtype=adapter_dtype or linear.weight.dtype)
        layer.lora_b = nn.Linear(rank, linear.out_features, bias=False, device=dev, dtype=adapter_dtype or linear.weight.dtype)
        layer.reset_adapter()
        return layer

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A as nn.Linear's default init (Kaiming-uniform), B = 0: the adapter starts as the identity update."""
        if self.lora_a.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapter_params(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight"]

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32: (out, in)."""
        return self.scaling * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def base_linear(self) -> nn.Linear:
        """A plain Linear sharing this layer's base weight and bias (as they are now: merged or not)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.data, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.data, requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:
            return out
        a = self.lora_a.weight
        update = self.lora_b(self.lora_a(self.dropout(x.to(a.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


# --- naming: our module names <-> the names another library uses for the same modules ------------------------------


def module_namer(model: nn.Module) -> Callable[[str], str]:
    """Our module name -> the name diffusers/peft use for it: the U-ViT through convert's key map, anything else
    (the transformers CLIP text encoder) as is."""
    from uvit import UViT

    if isinstance(model, UViT):
        from convert.diffusers_keys import UVIT_KEYMAP

        return lambda name: UVIT_KEYMAP.theirs(name + ".weight").removesuffix(".weight")
    return lambda name: name


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the Linear (or already LoRA) modules of `model` that any pattern matches (see module docstring)."""
    patterns = list(patterns)
    theirs = module_namer(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, LoRALinear)) or _inside_lora(name, model):
            continue
        aliases = {name, theirs(name)}
        if any(_matches(p, a) for p in patterns for a in aliases):
            found.append(name)
    return found


def _inside_lora(name: str, model: nn.Module) -> bool:
    """True for the lora_a / lora_b Linears of an injected layer (never targets themselves)."""
    parent, _, leaf = name.rpartition(".")
    return leaf in ("lora_a", "lora_b") and isinstance(model.get_submodule(parent) if parent else model, LoRALinear)


def inject_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype = torch.float32,
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """Replace every Linear of `model` matched by `targets` with a LoRALinear around it; freeze everything else.
    Returns the names of the adapted modules. Raises if nothing matches (a typo must not train nothing)."""
    targets = [aliases.get(t, t) if aliases else t for t in targets]
    names = find_targets(model, targets)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no Linear module of {type(model).__name__} matches the LoRA targets {targets}; some names: {linears[:8]}")
    model.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already carries a LoRA adapter")
        _set_submodule(model, name, LoRALinear.from_linear(module, rank, alpha, dropout, adapter_dtype))
    return names


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(model).values() for p in (layer.lora_a.weight, layer.lora_b.weight)]


def merge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def set_lora_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.disabled = not enabled
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain Linear layers back (with the update merged in when `merge`)."""
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_linear())
    return model


# --- adapter state: what a file holds -------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One module's adapter: A (rank, in), B (out, rank), alpha."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def get_adapters(model: nn.Module) -> dict[str, Adapter]:
    """Our module name -> its adapter (detached tensors)."""
    return {n: Adapter(l.lora_a.weight.detach(), l.lora_b.weight.detach(), l.alpha) for n, l in lora_layers(model).items()}


def set_adapters(model: nn.Module, adapters: Mapping[str, Adapter], dropout: float = 0.0, adapter_dtype=torch.float32) -> list[str]:
    """Load adapters into `model`. A module that already carries an adapter of the same rank gets the values copied
    in place (its parameters stay the ones an optimizer holds); plain Linears, or a different rank, get a new
    LoRALinear around the base weight. Every named module must exist and every shape fit; errors name each problem."""
    problems = []
    for name, ad in adapters.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            problems.append(f"{name}: is a {type(module).__name__}, not a Linear")
        elif tuple(ad.a.shape) != (ad.rank, module.in_features) or tuple(ad.b.shape) != (module.out_features, ad.rank):
            problems.append(
                f"{name}: A {tuple(ad.a.shape)} / B {tuple(ad.b.shape)} do not fit a Linear({module.in_features} -> {module.out_features})"
            )
    if problems:
        more = f" ... ({len(problems)} problems)" if len(problems) > 8 else ""
        raise ValueError(f"LoRA adapter does not fit {type(model).__name__}: " + "; ".join(problems[:8]) + more)
    for name, ad in adapters.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.unmerge()
            if module.rank != ad.rank:
                module = _replace(model, name, module.base_linear(), ad, dropout, adapter_dtype)
        else:
            module.requires_grad_(False)
            module = _replace(model, name, module, ad, dropout, adapter_dtype)
        module.alpha = float(ad.alpha)
        with torch.no_grad():
            module.lora_a.weight.copy_(ad.a)
            module.lora_b.weight.copy_(ad.b)
    return list(adapters)


def _replace(model, name, linear, ad, dropout, adapter_dtype) -> LoRALinear:
    layer = LoRALinear.from_linear(linear, ad.rank, ad.alpha, dropout, adapter_dtype)
    _set_submodule(model, name, layer)
    return layer


# --- files ------------------------------------------------------------------------------------------------------------


def to_muse_state_dict(adapters: Mapping[str, Adapter]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for name, ad in adapters.items():
        tensors[f"{name}.lora_a.weight"] = ad.a.contiguous()
        tensors[f"{name}.lora_b.weight"] = ad.b.contiguous()
    metadata = {"format": "pt", "lora_format": MUSE_FORMAT, "alphas": json.dumps({n: ad.alpha for n, ad in adapters.items()})}
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
    model: nn.Module, path: str | Path, fmt: str = "muse", prefix: str = "transformer", extra: Mapping[str, nn.Module] | None = None
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
    with safe_open(str(file), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
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
        raise ValueError(f"LoRA file names {len(unknown)} module(s) that {type(model).__name__} does not have: {unknown[:5]}")
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
        tensors, metadata = dict(path_or_tensors), {}
    else:
        tensors, metadata = read_lora_file(path_or_tensors)
    adapters = parse_adapters(tensors, metadata, model, prefix, alpha)
    names = set_adapters(model, adapters)
    if merge:
        merge_lora(model)
    return names
