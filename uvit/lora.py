"""LoRA: low-rank adapters on frozen Linear layers, injected by module name (the layer and its injection; the file
formats, ours and the diffusers/peft one, are in `convert.lora`).

    y = x W^T (+ b)  +  (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank), B starts at zero

`LoRALinear` keeps the frozen base weight where the replaced `nn.Linear` kept it (`<module>.weight`), so the base
model's state dict, its key map to diffusers and its checkpoints are unchanged by injection; the adapter adds
`<module>.lora_a.weight` and `<module>.lora_b.weight`.

Targets are chosen by module name. A pattern matches a Linear whose name equals it, ends with `.<pattern>`, or
fully matches it as a regex. A `namer` (our module name -> another library's name for it, e.g.
`convert.lora.module_namer(model)`) lets a pattern match either name, so the reference's `to_q to_k to_v` and our
`q k v` pick the same layers of the U-ViT. Works on any model: the U-ViT, or a transformers CLIP text encoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Namer = Callable[[str], str]  # our module name -> the name another library uses for the same module


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
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
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
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, adapter_dtype=torch.float32
    ) -> "LoRALinear":
        """Wrap an existing Linear: its weight (and bias) become the frozen base, shared, not copied."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None)
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        dev = linear.weight.device
        layer.lora_a = nn.Linear(
            linear.in_features, rank, bias=False, device=dev, dtype=adapter_dtype or linear.weight.dtype
        )
        layer.lora_b = nn.Linear(
            rank, linear.out_features, bias=False, device=dev, dtype=adapter_dtype or linear.weight.dtype
        )
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
        h = self.lora_a(self.dropout(x.to(a.dtype)))  # (..., rank)
        if _power_of_two(self.scaling):
            # scaling by a power of two is exact, so it can act on the rank-wide intermediate instead of the
            # out-wide update (out / rank times fewer multiplications, forward and backward): the same bits
            update = self.lora_b(h * self.scaling)
        else:
            update = self.lora_b(h) * self.scaling
        return out + update.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _power_of_two(x: float) -> bool:
    """x = 2**k for an integer k (the default alpha / rank = 32 / 16 is): multiplying by it only shifts exponents."""
    return x > 0 and math.frexp(x)[0] == 0.5


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, patterns: Iterable[str], namer: Namer | None = None) -> list[str]:
    """Names of the Linear (or already LoRA) modules of `model` that any pattern matches, by our name or, with a
    `namer`, by the other library's name (see the module docstring)."""
    patterns = list(patterns)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, LoRALinear)) or _inside_lora(name, model):
            continue
        aliases = {name, namer(name)} if namer is not None else {name}
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
    namer: Namer | None = None,
) -> list[str]:
    """Replace every Linear of `model` matched by `targets` with a LoRALinear around it; freeze everything else.
    Returns the names of the adapted modules. Raises if nothing matches (a typo must not train nothing)."""
    targets = [aliases.get(t, t) if aliases else t for t in targets]
    names = find_targets(model, targets, namer)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no Linear module of {type(model).__name__} matches the LoRA targets {targets}; some names: {linears[:8]}"
        )
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
    return {
        n: Adapter(layer.lora_a.weight.detach(), layer.lora_b.weight.detach(), layer.alpha)
        for n, layer in lora_layers(model).items()
    }


def set_adapters(
    model: nn.Module, adapters: Mapping[str, Adapter], dropout: float = 0.0, adapter_dtype=torch.float32
) -> list[str]:
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
