"""vqgan: the aMUSEd image tokenizer (pixels in [0, 1] <-> codebook ids)."""

from .config import VQGANConfig
from .model import VQGAN, QuantizerOutput, VectorQuantizer

__all__ = ["VQGAN", "VQGANConfig", "VectorQuantizer", "QuantizerOutput"]
