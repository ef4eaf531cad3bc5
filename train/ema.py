"""Exponential moving average of the trained weights.

    shadow <- decay * shadow + (1 - decay) * weight,   after every optimizer step

with decay = min(max_decay, (1 + s) / (10 + s)) (warm-up, the reference's default) or max_decay throughout,
where s = optimizer steps - update_after_step - 1; while s <= 0 the shadow just copies the weights.
The shadow is fp32 whatever the weights' dtype. `swapped_in(model)` puts the averaged weights into the model for
validation or saving and restores the trained ones afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        max_decay: float = 0.9999,
        update_after_step: int = 0,
        warmup: bool = True,
    ):
        self.params = {n: p for n, p in named_params if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.max_decay, self.update_after_step, self.warmup = max_decay, update_after_step, warmup
        self.num_updates = 0

    def decay(self) -> float:
        s = self.num_updates - self.update_after_step - 1
        if s <= 0:
            return 0.0
        return min(self.max_decay, (1 + s) / (10 + s)) if self.warmup else self.max_decay

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = self.decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    @contextmanager
    def swapped_in(self):
        """Within the block the parameters hold the averaged weights; the trained ones come back afterwards."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not fit the trained parameters: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for n, t in state.items():
            self.shadow[n].copy_(t)
        self.num_updates = num_updates
