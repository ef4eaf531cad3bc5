"""sampling: masking schedules, samplers and the steps of MaskGIT-style parallel decoding, as pure tensor functions.

Independent of the models: everything takes logits and token ids. With default arguments every function computes
what the reference (diffusers' AmusedScheduler and Amused pipelines) computes, consuming random numbers in the
same order, so the same generator gives the same tokens.

Samplers (`SAMPLERS`, `make_sampler`; see `sampling.samplers`) choose which positions stay masked after each step:
"confidence" (the reference), "halton" (a 2D Halton spatial order), "random" (a uniformly random order) and
"remask" (ReMDM-style re-masking of decoded tokens). Refinement passes after decoding (`sampling.refine`) revisit
decoded tokens with the rest of the image fixed.
"""

from .refine import refine_mask, refine_ratios, refine_step
from .samplers import (
    REMASK_CHOICES,
    REMASK_STRATEGIES,
    SAMPLERS,
    ConfidenceSampler,
    HaltonSampler,
    RandomSampler,
    RemaskSampler,
    RemaskState,
    Sampler,
    StepResult,
    StepView,
    check_interval,
    halton_order,
    halton_ranks,
    keep_lowest,
    make_sampler,
    radical_inverse,
    random_offsets,
    remask_count,
    sample_step,
)
from .schedules import (
    GUIDANCE_SCHEDULES,
    SCHEDULE_NAMES,
    GuidanceSchedule,
    GuidanceScheduleLike,
    MaskingSchedule,
    ScheduleLike,
    guidance_scales,
    mask_ratio,
    progress,
    remask_temperatures,
    token_temperatures,
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
    scheduled_count,
    token_probabilities,
    uniform_noise,
)

__all__ = [
    "Generators",
    "ScheduleLike",
    "GUIDANCE_SCHEDULES",
    "GuidanceSchedule",
    "GuidanceScheduleLike",
    "REMASK_CHOICES",
    "REMASK_STRATEGIES",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "ConfidenceSampler",
    "HaltonSampler",
    "MaskingSchedule",
    "RandomSampler",
    "RemaskSampler",
    "RemaskState",
    "Sampler",
    "StepResult",
    "StepView",
    "check_interval",
    "classifier_free_guidance",
    "decode_step",
    "draw_tokens",
    "guidance_scales",
    "gumbel_noise",
    "halton_order",
    "halton_ranks",
    "keep_lowest",
    "lowest_confidence",
    "make_sampler",
    "mask_ratio",
    "progress",
    "radical_inverse",
    "random_mask",
    "random_offsets",
    "refine_mask",
    "refine_ratios",
    "refine_step",
    "remask_count",
    "remask_temperatures",
    "sample_step",
    "scheduled_count",
    "token_probabilities",
    "token_temperatures",
    "tokens_to_mask",
    "uniform_noise",
]
