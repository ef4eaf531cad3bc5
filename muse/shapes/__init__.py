"""The shapes domain, in one room: the synthetic world of the embedded demo model.

One flat shape on a flat background, described by a caption of at most five attribute words:

    domain     the vocabulary (8 colours, 3 shapes, 3 sizes, 3x3 positions), scenes, captions, the held-out triples
    render     scenes -> anti-aliased pixels (batched), a dataset and an endless stream of batches
    judge      pixels -> the attributes they show (pixel-only), marks and their summary
    evaluate   prompt adherence of a pipeline on held-out prompts (`muse shapes-eval`)
    figures    the README figures drawn from a model of the domain
    embedded   where the embedded model's files live (`MODEL_DIR`)

The recipe that trains the embedded model from nothing is `train.default_model` (a recipe: nothing imports it).
`evaluate` and `figures` load a `muse.Pipeline`; import them by name (they are not imported here, so that the
pipeline itself can import this package for `MODEL_DIR`).
"""

from .domain import (
    ALL_TRIPLES,
    COLOUR_NAMES,
    COLOURS,
    HELDOUT,
    IMAGE_SIZE,
    JITTER,
    POSITION_NAMES,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    SPLITS,
    TRAIN_TRIPLES,
    Scenes,
    caption,
    captions,
    palette,
    parse_caption,
    sample_scenes,
)
from .embedded import MODEL_DIR, model_dir
from .judge import AdherenceReport, Verdict, judge, judge_one, score, summarise
from .render import ShapesDataset, coverage, render, stream

__all__ = [
    "ALL_TRIPLES",
    "COLOURS",
    "COLOUR_NAMES",
    "HELDOUT",
    "IMAGE_SIZE",
    "JITTER",
    "MODEL_DIR",
    "POSITIONS",
    "POSITION_NAMES",
    "POSITION_PHRASES",
    "SHAPES",
    "SIZES",
    "SIZE_NAMES",
    "SPLITS",
    "TRAIN_TRIPLES",
    "AdherenceReport",
    "Scenes",
    "ShapesDataset",
    "Verdict",
    "caption",
    "captions",
    "coverage",
    "judge",
    "judge_one",
    "palette",
    "parse_caption",
    "model_dir",
    "render",
    "sample_scenes",
    "score",
    "stream",
    "summarise",
]
