"""Optimizer and learning-rate schedule.

Parameter groups follow the reference: no weight decay for parameters whose diffusers name contains "bias",
"layer_norm.weight", "mlm_ln.weight" or "embeddings.weight" (our U-ViT names are translated through convert's key
map first, so the same tensors are exempt: the token embedding table and the embedding and head RMSNorm weights).
The optimizer is torch AdamW (fused kernel where available: no temporary copies of the parameters) or
bitsandbytes AdamW8bit (8-bit moment states, a quarter of the memory of AdamW's), whose CPU update runs fused
(`train/adamw8bit.py`: the same numbers, a quarter of the time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from convert.diffusers_keys import UVIT_KEYMAP

from . import adamw8bit

NO_DECAY = ("bias", "layer_norm.weight", "mlm_ln.weight", "embeddings.weight")


def decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, rename: Callable[[str], str] = lambda n: n
) -> list[dict]:
    """[{params with decay}, {params without}] over the trainable parameters; `rename` gives the name the NO_DECAY
    rule reads (the diffusers name)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if any(nd in rename(name) for nd in NO_DECAY) else decay).append(p)
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]


def uvit_rename(name: str) -> str:
    """Our U-ViT parameter name -> its diffusers name (adapter parameters keep their own suffix)."""
    return UVIT_KEYMAP.theirs(name)


def build_optimizer(
    groups: list[dict], lr: float, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, use_8bit: bool = False
):
    if not any(g["params"] for g in groups):
        raise ValueError("nothing to train: no parameter requires a gradient")
    if use_8bit:
        try:
            cls = adamw8bit.optimizer_class()  # imports bitsandbytes: only with --use_8bit_adam
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from e
        return cls(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused or None)


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def lr_multiplier(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """step -> factor on the base learning rate. `constant` ignores the warm-up (as the reference's default);
    the others ramp linearly from 0 over `warmup` steps (diffusers' convention), then hold (constant_with_warmup), fall linearly to 0 (linear) or
    follow half a cosine to 0 (cosine) at `total`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose from {SCHEDULES}")

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return factor


def build_scheduler(optimizer, name: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(name, warmup, total))


class StepInBackward:
    """The optimizer's step taken for each parameter as soon as the backward pass has its gradient complete, and
    the gradient freed at once: the full set of gradients (the size of the trained weights) never exists.

    Only for one gradient per step that nothing else reads before the step: no accumulation over micro-batches,
    no clipping (it needs every gradient first), no fp16 grad scaler (it checks every gradient for inf first), one
    process (data parallel averages the gradients after the backward). Then each parameter's update is the one
    the whole-model step would make, bit for bit: AdamW (fused or not) and bitsandbytes' AdamW8bit update every
    parameter from its own gradient and state alone. The step runs the same optimizer object on a one-parameter
    view of the parameter's group, so its state (and `state_dict`, for checkpoints) is the usual one; the
    learning-rate schedule still steps once per optimizer step. A parameter is stepped only after its last use in
    the backward (autograd fires the hook after the gradient is accumulated), so no later gradient reads a stepped
    weight."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]):
        self.optimizer = optimizer
        self._groups, self._group = None, {}  # the optimizer's group list, and each parameter's group in it
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def _step(self, p: nn.Parameter) -> None:
        groups = self.optimizer.param_groups
        if groups is not self._groups:  # first call, or new groups (Optimizer.load_state_dict makes new ones)
            self._groups, self._group = groups, {q: g for g in groups for q in g["params"]}
        self.optimizer.param_groups = [{**self._group[p], "params": [p]}]  # the group's settings, as they are now
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
