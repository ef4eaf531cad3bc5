"""muse: the aMUSEd pipeline (text to image, image to image, inpainting), its evaluation, the shapes domain of the
embedded demo model, and the command line (`muse`, or `python -m muse`).

    pipeline     Pipeline: text to image, image to image, inpainting (composes uvit, vqgan, sampling, convert)
    text         prompts -> the U-ViT's text conditioning
    images       pixels in and out, masks, grids
    evaluation   CLIP score, FID, sweeps (`muse evaluate`)
    shapes       the synthetic domain of the embedded model: language, renderer, judge (`muse shapes-eval`)
    cli          the command line
"""

from .pipeline import Pipeline, SamplingOptions
from .shapes.embedded import MODEL_DIR as DEFAULT_MODEL_DIR
from .text import TextConditioning, encode_text

__all__ = ["DEFAULT_MODEL_DIR", "Pipeline", "SamplingOptions", "TextConditioning", "encode_text"]
