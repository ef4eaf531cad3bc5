"""muse: the aMUSEd pipeline (text to image, image to image, inpainting) and the command line (`python -m muse`)."""

from .pipeline import DEFAULT_MODEL_DIR, Pipeline, SamplingOptions
from .text import TextConditioning, encode_text

__all__ = ["DEFAULT_MODEL_DIR", "Pipeline", "SamplingOptions", "TextConditioning", "encode_text"]
