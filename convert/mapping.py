"""Checked state-dict translation between a foreign naming (diffusers, open-muse) and ours.

A `KeyMap` is an ordered list of regex rules from our parameter names to the foreign ones, plus per-key layout
transforms (a Linear stored by the other side as a 1x1 conv, a vector stored as (1, 1, 1, C)). Loading walks every
parameter our model expects, finds its foreign name, checks that it exists and has the right shape, and fails loudly
on anything missing, misshapen or left over: never a silent partial load. Models are built on the meta device and
the loaded tensors assigned, so a full-size model loads without a slow random initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


class ConversionError(ValueError):
    """A state dict that does not fit the model: names every missing, unexpected or misshapen tensor."""


class WeightValueError(ConversionError):
    """Tensors of the right names and shapes whose values cannot be weights: an integer dtype where the model has
    floats (a corrupt or rewritten header), or NaN / inf values."""


# the dtypes a float weight may be stored in (float8 and the like are not weights this model reads)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def value_problem(name: str, tensor: torch.Tensor, expected: torch.dtype) -> str | None:
    """Why `tensor` cannot fill a model tensor of dtype `expected`, or None. Reads the tensor once (the finiteness
    check), which loading reads anyway."""
    if not expected.is_floating_point:
        return None
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{name}: stored as {str(tensor.dtype).removeprefix('torch.')}, not a float type"
    if tensor.is_meta:  # shapes only (a dry run of a conversion): no values to check
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    return f"{name}: {tensor.numel() - int(finite.sum())} of {tensor.numel()} values are NaN or infinite"


def value_error(what: str, problems: list[str]) -> WeightValueError:
    wrong_type = [p for p in problems if "not a float type" in p]
    hint = (
        "; the model's weights are float32, float16 or bfloat16: the file's header is corrupt or was rewritten"
        if wrong_type
        else "; the weights are corrupt (or were trained into NaN)"
    )
    return WeightValueError(f"{what}: {len(problems)} tensor(s) cannot be weights: {_preview(problems)}{hint}")


@dataclass(frozen=True)
class Layout:
    """How one tensor's layout differs between us and the other side: `to_theirs(ours)`, `to_ours(theirs)`."""

    name: str
    to_theirs: Callable[[torch.Tensor], torch.Tensor]
    to_ours: Callable[[torch.Tensor], torch.Tensor]


SAME = Layout("same", lambda t: t, lambda t: t)
# our Linear (out, in) <-> their 1x1 conv (out, in, 1, 1)
LINEAR_AS_CONV1X1 = Layout("conv1x1", lambda t: t[:, :, None, None], lambda t: t.reshape(t.shape[0], t.shape[1]))
# our vector (C,) <-> their (1, 1, 1, C)
VECTOR_AS_4D = Layout("1x1x1xC", lambda t: t.view(1, 1, 1, -1), lambda t: t.reshape(-1))


@dataclass
class KeyMap:
    """rules: (regex on our name, replacement giving their name); the first rule that matches wins.
    layouts: (regex on our name, Layout) for tensors stored differently."""

    rules: list[tuple[str, str]]
    layouts: list[tuple[str, Layout]] = field(default_factory=list)

    def theirs(self, ours: str) -> str:
        for pattern, repl in self.rules:
            if re.fullmatch(pattern, ours):
                return re.sub(pattern, repl, ours)
        return ours

    def layout(self, ours: str) -> Layout:
        for pattern, layout in self.layouts:
            if re.fullmatch(pattern, ours):
                return layout
        return SAME


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}


def to_ours(
    model: nn.Module,
    keymap: KeyMap,
    state_dict: Mapping[str, torch.Tensor],
    what: str = "state dict",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill `model` (usually built on the meta device) from a foreign `state_dict`, checking every key and shape.
    Raises ConversionError naming each missing, unexpected or misshapen tensor."""
    shapes = expected_shapes(model)
    dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    wanted = {keymap.theirs(k): k for k in shapes}
    missing = sorted(t for t in wanted if t not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in wanted)
    converted, misshapen, bad_values = {}, [], []
    for theirs, ours in wanted.items():
        if theirs not in state_dict:
            continue
        tensor = state_dict[theirs]
        # the foreign tensor must have exactly the foreign shape (a (C,) where they store (1, 1, 1, C) is refused too)
        expected = _theirs_shape(keymap, ours, shapes[ours])
        if tuple(tensor.shape) != tuple(expected):
            misshapen.append(f"{theirs}: got {tuple(tensor.shape)}, expected {tuple(expected)}")
            continue
        problem = value_problem(theirs, tensor, dtypes[ours])
        if problem is not None:
            bad_values.append(problem)
            continue
        value = keymap.layout(ours).to_ours(tensor)
        converted[ours] = value if dtype is None else value.to(dtype)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_preview(unexpected)}")
    if misshapen:
        problems.append(f"misshapen {len(misshapen)} tensor(s): {_preview(misshapen)}")
    if problems:
        raise ConversionError(f"{what} does not fit {type(model).__name__}: " + "; ".join(problems))
    if bad_values:
        raise value_error(what, bad_values)
    model.load_state_dict(converted, strict=True, assign=True)
    return model


def to_theirs(model: nn.Module, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """Our model's parameters under the foreign names and layouts (contiguous tensors, ready for safetensors)."""
    return tensors_to_theirs(model.state_dict(), keymap)


def tensors_to_theirs(tensors: Mapping[str, torch.Tensor], keymap: KeyMap) -> dict[str, torch.Tensor]:
    """Any dict keyed by our parameter names (a state dict, its gradients, optimizer moments) under the foreign
    names and layouts."""
    return {keymap.theirs(ours): keymap.layout(ours).to_theirs(t.detach()).contiguous() for ours, t in tensors.items()}


def _theirs_shape(keymap: KeyMap, ours: str, shape: torch.Size) -> torch.Size:
    return keymap.layout(ours).to_theirs(torch.empty(shape, device="meta")).shape


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
