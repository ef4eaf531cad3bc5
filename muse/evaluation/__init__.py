"""Evaluate generations the way papers do: CLIP score, FID and time per image over a grid of sampling settings.

prompts.py     prompt sets: text / JSON / JSONL / CSV files, Hugging Face dataset columns
sweep.py       Setting, expand_grid, run_sweep: resumable, batched generation with reproducible per-image seeds
generate.py    PipelineGenerator: the sweep's generate(setting, prompts, seeds) for muse.Pipeline
clip_score.py  CLIP score with open_clip (100 * cosine, clipped at 0)
fid.py         FID with torch-fidelity's Inception (what the number corresponds to is stated there)
report.py      results.csv / results.json, the plot against guidance scale, image grids
evaluate.py    evaluate(): the sweep, then the metrics and the reports
command.py     `python -m muse evaluate` (add_parser / run)
"""

from .clip_score import ClipScorer, clip_score_from_embeddings
from .errors import MissingWeightsError
from .evaluate import evaluate
from .fid import InceptionFID, feature_statistics, frechet_distance
from .prompts import load_prompts
from .sweep import Setting, expand_grid, image_seed, run_sweep

__all__ = [
    "ClipScorer",
    "InceptionFID",
    "MissingWeightsError",
    "Setting",
    "clip_score_from_embeddings",
    "evaluate",
    "expand_grid",
    "feature_statistics",
    "frechet_distance",
    "image_seed",
    "load_prompts",
    "run_sweep",
]
