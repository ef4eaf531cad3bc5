"""convert: foreign weights (diffusers, open-muse) <-> ours, every tensor accounted for."""

from .components import Components
from .loading import export_diffusers, load_components, save_components
from .mapping import ConversionError, KeyMap
from .networks import uvit_from_diffusers, uvit_to_diffusers, vqgan_from_diffusers, vqgan_to_diffusers
from .safe_load import CheckpointError

__all__ = [
    "CheckpointError",
    "Components",
    "ConversionError",
    "KeyMap",
    "export_diffusers",
    "load_components",
    "save_components",
    "uvit_from_diffusers",
    "uvit_to_diffusers",
    "vqgan_from_diffusers",
    "vqgan_to_diffusers",
]
