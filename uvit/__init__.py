"""uvit: the masked-token transformer of aMUSEd (token ids + text -> logits over the VQ codebook)."""

from .config import UViTConfig
from .model import UViT

__all__ = ["UViT", "UViTConfig"]
