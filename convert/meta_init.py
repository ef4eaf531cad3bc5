"""Building modules on the meta device without running their random initialisation.

On the meta device `reset_parameters` allocates nothing, but its init calls still run through torch's dispatch for
every parameter, which is most of the time a 600M-parameter U-ViT takes to build there. Every tensor of a module
built for loading is replaced by a checkpoint tensor right after, so the initialisation is skipped for modules whose
weights are on the meta device (a module built on a real device, by another thread, is initialised as usual).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# the classes that define `reset_parameters` for the layers these networks use (convolutions inherit theirs)
_INITIALISED = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def _skip_on_meta(original):
    def reset_parameters(self):
        weight = getattr(self, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            return None
        return original(self)

    return reset_parameters


@contextlib.contextmanager
def skip_meta_init():
    """Within this block, standard layers whose weights are on the meta device skip their random init."""
    saved = {cls: cls.__dict__["reset_parameters"] for cls in _INITIALISED if "reset_parameters" in cls.__dict__}
    for cls, original in saved.items():
        cls.reset_parameters = _skip_on_meta(original)
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.reset_parameters = original


@contextlib.contextmanager
def empty_modules():
    """Within this block, modules are built on the meta device, without their random init."""
    with skip_meta_init(), torch.device("meta"):
        yield
