"""Refinement after decoding: passes that mask a random share of the decoded tokens again and put back the model's
most likely code for each, the rest of the image held fixed.

Parallel decoding draws the tokens of one step independently of each other, and a token, once drawn, is never
revisited (the reference's sampler). A refinement pass revisits them: each decoded token is masked with
probability `ratio` (a Bernoulli draw, as `random_mask`), the model predicts the masked ones from the visible
ones, and each masked token becomes its most likely code (argmax, no draw). That is one step of coordinate ascent
on the model's own pseudo-likelihood: a token that its neighbours make unlikely (a speck, a bite out of an outline)
is replaced by one they make likely. A pass costs one model evaluation, like a decoding step.

Tokens that were known when the call started (image to image, inpainting) are never masked, so never changed.
Random numbers: one uniform per position per pass, from the caller's generator (row b from generator b when a list
is given), after the decoding steps' draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .step import Generators, uniform_noise


def refine_ratios(num_passes: int, ratio: float | Sequence[float] = 0.3) -> list[float]:
    """The masking probability of each refinement pass (Python floats). A number is used at every pass; a
    (start, end) pair is annealed linearly from `start` at the first pass to `end` at the last (one pass uses
    `start`). Each value must lie in (0, 1]."""
    if isinstance(num_passes, bool) or not isinstance(num_passes, int) or num_passes < 0:
        raise ValueError(f"the number of refinement passes must be an integer >= 0, got {num_passes!r}")
    if any(isinstance(r, bool) for r in (ratio if isinstance(ratio, (tuple, list)) else (ratio,))):
        raise ValueError(f"a refinement ratio is a number or a (start, end) pair, got {ratio!r}")
    if isinstance(ratio, (tuple, list)):
        if len(ratio) != 2:
            raise ValueError(f"a refinement ratio is a number or a (start, end) pair, got {ratio!r}")
        start, end = (float(r) for r in ratio)
    else:
        start = end = float(ratio)
    for value in (start, end):
        if not 0.0 < value <= 1.0:  # also refuses NaN
            raise ValueError(f"a refinement ratio must lie in (0, 1], got {ratio!r}")
    if num_passes == 1:
        return [start]
    return [start + (end - start) * i / (num_passes - 1) for i in range(num_passes)]


def refine_mask(
    editable: torch.Tensor,  # (B, L) bool: positions the pass may change (decoded during the call)
    ratio: float,
    generator: Generators = None,
) -> torch.Tensor:  # (B, L) bool
    """The positions one pass masks: each editable position with probability `ratio` (u < ratio, u ~ U(0, 1))."""
    u = uniform_noise(torch.empty(editable.shape, device=editable.device), generator)
    return editable & (u < ratio)


def refine_step(
    logits: torch.Tensor,  # (B, L, K) over the codebook, computed with the `masked` positions masked
    tokens: torch.Tensor,  # (B, L) long: the decoded tokens before the pass
    masked: torch.Tensor,  # (B, L) bool: the positions masked for this pass (`refine_mask`)
) -> torch.Tensor:  # (B, L) long
    """The tokens after one pass: each masked position gets its most likely code, the others keep theirs."""
    return torch.where(masked, logits.argmax(dim=-1), tokens)
