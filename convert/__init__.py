"""convert: foreign weights (diffusers, open-muse) <-> ours, every tensor accounted for."""

from .mapping import ConversionError, KeyMap
from .networks import uvit_from_diffusers, uvit_to_diffusers, vqgan_from_diffusers, vqgan_to_diffusers

__all__ = [
    "ConversionError",
    "KeyMap",
    "uvit_from_diffusers",
    "uvit_to_diffusers",
    "vqgan_from_diffusers",
    "vqgan_to_diffusers",
]
