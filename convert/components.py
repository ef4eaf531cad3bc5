"""What a loaded aMUSEd pipeline is made of, whatever format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from uvit import UViT, UViTConfig
from vqgan import VQGAN

from .safe_load import CheckpointError

MASKING_SCHEDULES = ("cosine", "linear")


@dataclass
class Components:
    transformer: UViT
    vqvae: VQGAN
    text_encoder: nn.Module  # transformers CLIPTextModelWithProjection
    tokenizer: object  # transformers CLIPTokenizer, pads with <|endoftext|> (49407) to 77
    scheduler_config: dict = field(
        default_factory=dict
    )  # {"mask_token_id": int, "masking_schedule": "cosine"|"linear"}
    source: str = ""  # where it came from (a path or a hub id)

    MODULES = ("transformer", "vqvae", "text_encoder")

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.MODULES}

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: next(m.parameters()).dtype for name, m in self.modules().items()}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Components":
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self


def default_scheduler_config(mask_token_id: int) -> dict:
    return {"mask_token_id": int(mask_token_id), "masking_schedule": "cosine"}


def check_scheduler_config(config: dict, uvit_config: UViTConfig, path) -> dict:
    """The scheduler config, checked against the transformer (raises CheckpointError naming `path`)."""
    if config["masking_schedule"] not in MASKING_SCHEDULES:
        raise CheckpointError(
            f"{path}: masking_schedule {config['masking_schedule']!r} is not one of {MASKING_SCHEDULES}"
        )
    mask = config["mask_token_id"]
    if not (uvit_config.codebook_size <= mask < uvit_config.vocab_size):
        raise CheckpointError(
            f"{path}: mask_token_id {mask} is not a non-code token of the transformer "
            f"(codes are 0..{uvit_config.codebook_size - 1}, vocab_size {uvit_config.vocab_size})"
        )
    return config
