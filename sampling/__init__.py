"""sampling: masking schedules and confidence-based parallel decoding (MaskGIT), as pure tensor functions.

Independent of the models: everything takes logits and token ids. With default arguments every function computes
what the reference (diffusers' AmusedScheduler and Amused pipelines) computes, consuming random numbers in the
same order, so the same generator gives the same tokens.
"""

from .schedules import (
    GUIDANCE_SCHEDULES,
    SCHEDULE_NAMES,
    MaskingSchedule,
    ScheduleLike,
    guidance_scales,
    mask_ratio,
    progress,
    remask_temperatures,
    tokens_to_mask,
)
from .step import (
    Generators,
    classifier_free_guidance,
    decode_step,
    draw_tokens,
    gumbel_noise,
    lowest_confidence,
    random_mask,
    token_probabilities,
)

__all__ = [
    "Generators",
    "ScheduleLike",
    "GUIDANCE_SCHEDULES",
    "SCHEDULE_NAMES",
    "MaskingSchedule",
    "classifier_free_guidance",
    "decode_step",
    "draw_tokens",
    "guidance_scales",
    "gumbel_noise",
    "lowest_confidence",
    "mask_ratio",
    "progress",
    "random_mask",
    "remask_temperatures",
    "token_probabilities",
    "tokens_to_mask",
]
