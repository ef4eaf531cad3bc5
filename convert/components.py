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
    """The three networks, the tokenizer and the scheduler settings. A network is None where the loader was asked
    for only some of them (`load_components(..., networks=...)`): such a set can serve, not be saved."""

    transformer: UViT | None
    vqvae: VQGAN | None
    text_encoder: nn.Module | None  # transformers CLIPTextModelWithProjection
    tokenizer: object  # transformers CLIPTokenizer, pads with <|endoftext|> (49407) to 77
    scheduler_config: dict = field(
        default_factory=dict
    )  # {"mask_token_id": int, "masking_schedule": "cosine"|"linear"}
    source: str = ""  # where it came from (a path or a hub id)

    MODULES = ("transformer", "vqvae", "text_encoder")

    def modules(self) -> dict[str, nn.Module]:
        """The networks that are loaded, by name."""
        return {name: getattr(self, name) for name in self.MODULES if getattr(self, name) is not None}

    def check_complete(self, action: str) -> None:
        """Raise ValueError naming the networks that are not loaded (`action`: what needed them all)."""
        missing = [name for name in self.MODULES if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"cannot {action}: {', '.join(missing)} not loaded (these components were loaded with networks=...)"
            )

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
