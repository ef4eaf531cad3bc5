"""The two networks in and out of diffusers' format: config dicts and state dicts, fully checked."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from uvit import UViT, UViTConfig
from vqgan import VQGAN, VQGANConfig

from .diffusers_keys import UVIT_KEYMAP, VQGAN_KEYMAP
from .mapping import ConversionError, to_ours, to_theirs

# the diffusers version whose config format these dicts follow (written into exported config.json files)
DIFFUSERS_VERSION = "0.42.1"


def uvit_from_diffusers(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> UViT:
    """A diffusers `UVit2DModel` (its config.json content and state dict) -> our UViT, every tensor checked.

    Built on the meta device, then the state dict's tensors are assigned, not copied (where no layout change or cast
    is needed the model shares their memory). Returned in eval mode, on the tensors' device, in their dtype unless
    `dtype` is given. Raises ConversionError naming every missing, unexpected or misshapen tensor."""
    cfg = config if isinstance(config, UViTConfig) else UViTConfig.from_dict(dict(config))
    with torch.device("meta"):
        model = UViT(cfg)
    return to_ours(model, UVIT_KEYMAP, state_dict, what="U-ViT state dict", dtype=dtype).eval()


def vqgan_from_diffusers(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> VQGAN:
    """A diffusers `VQModel` (its config.json content and state dict) -> our VQGAN, every tensor checked.
    Built and returned as `uvit_from_diffusers` does (meta device, tensors assigned, eval mode, `dtype` optional)."""
    cfg = config if isinstance(config, VQGANConfig) else VQGANConfig.from_dict(dict(config))
    with torch.device("meta"):
        model = VQGAN(cfg)
    return to_ours(model, VQGAN_KEYMAP, state_dict, what="VQ-GAN state dict", dtype=dtype).eval()


def uvit_to_diffusers(model: UViT) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our UViT -> (diffusers `UVit2DModel` config dict, state dict under diffusers names)."""
    extras = model.config.ours_only()
    if extras:
        used = ", ".join(f"{key}={value!r}" for key, value in extras.items())
        raise ConversionError(
            f"this U-ViT uses {used}, which diffusers' UVit2DModel does not have: it can be saved in our format only"
        )
    config = {"_class_name": "UVit2DModel", "_diffusers_version": DIFFUSERS_VERSION, **model.config.to_diffusers_dict()}
    return config, to_theirs(model, UVIT_KEYMAP)


def vqgan_to_diffusers(model: VQGAN) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our VQGAN -> (diffusers `VQModel` config dict, state dict under diffusers names)."""
    config = {"_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION, **model.config.to_diffusers_dict()}
    return config, to_theirs(model, VQGAN_KEYMAP)
