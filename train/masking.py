"""Masking for masked-token training, and the loss on the masked tokens.

Per sample (the reference's recipe): t ~ U(0, 1), masking ratio r = max(cos(t * pi / 2), min_masking_rate) (ours:
another of `sampling.schedules`' masking schedules in place of the cosine, e.g. linear: r = 1 - t),
n = round(L * r) (at least 1) positions chosen exactly, through a random permutation (argsort of uniform noise). Optionally (the original large
runs, for inpainting) a fraction of the samples gets one random rectangle of about n tokens instead.

Masks are drawn from a generator for the GLOBAL batch (every process draws the same numbers, each takes its rows),
so a run on k processes masks exactly what one process with the k-times batch masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sampling.schedules import MaskingSchedule

IGNORE = -100  # label of the positions that are not masked (no loss)


@dataclass
class MaskingConfig:
    min_masking_rate: float = 0.0  # lower bound of the masking ratio
    rect_mask_prob: float = 0.0  # fraction of samples masked with a rectangle instead of scattered tokens
    label_smoothing: float = 0.0
    # ours: the schedule r = schedule(t) of the masking ratio, a name of `sampling.schedules` ("cosine": the reference)
    # or a MaskingSchedule; parsed once here, so an unknown name fails before the first step
    schedule: str | MaskingSchedule = "cosine"

    def __post_init__(self):
        self.schedule = MaskingSchedule.parse(self.schedule)


@dataclass
class Masks:
    mask: torch.Tensor  # (B, h, w) bool, True = masked
    ratio: torch.Tensor  # (B,) the masking ratio r each sample drew

    def rows(self, start: int, stop: int) -> "Masks":
        return Masks(self.mask[start:stop], self.ratio[start:stop])


def draw_masks(batch: int, h: int, w: int, cfg: MaskingConfig, generator: torch.Generator) -> Masks:
    """Masks for `batch` samples of an h x w token grid, on the generator's device (CPU).
    The draws are always the same four tensors in the same order, whatever the options."""
    L = h * w
    t = torch.rand(batch, generator=generator)
    noise = torch.rand(batch, L, generator=generator)
    use_rect = torch.rand(batch, generator=generator) < cfg.rect_mask_prob
    rect_u = torch.rand(batch, 3, generator=generator)  # (height choice, top, left) in [0, 1)

    ratio = cfg.schedule(t).clamp(min=cfg.min_masking_rate)  # the cosine's cos(t pi / 2) is the reference's to the bit
    count = (L * ratio).round().clamp(min=1).long()  # (B,)
    # exactly `count` positions: those whose entry of the noise's argsort permutation is below count (the reference)
    mask = (noise.argsort(dim=-1) < count[:, None]).view(batch, h, w)
    for i in torch.nonzero(use_rect).flatten().tolist():
        mask[i] = rectangle(h, w, int(count[i]), rect_u[i])
    return Masks(mask, ratio)


def rectangle(h: int, w: int, count: int, u: torch.Tensor) -> torch.Tensor:
    """A (h, w) bool mask with one rectangle of about `count` cells: its height is drawn among those for which a
    width <= w can hold `count` cells, its width rounds count / height, its place is uniform."""
    lo = max(1, math.ceil(count / w))
    rh = lo + int(u[0] * (h - lo + 1))
    rw = min(w, max(1, round(count / rh)))
    top = int(u[1] * (h - rh + 1))
    left = int(u[2] * (w - rw + 1))
    out = torch.zeros(h, w, dtype=torch.bool)
    out[top : top + rh, left : left + rw] = True
    return out


def apply_masks(tokens: torch.Tensor, mask: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, h, w) -> (input ids with the mask id where masked, labels = the token there and IGNORE elsewhere)."""
    mask = mask.to(tokens.device)
    inputs = torch.where(mask, torch.full_like(tokens, mask_id), tokens)
    labels = torch.where(mask, tokens, torch.full_like(tokens, IGNORE))
    return inputs, labels


def masked_cross_entropy(
    logits: torch.Tensor,  # (B, h, w, K) channels last
    labels: torch.Tensor,  # (B, h, w), IGNORE where not masked
    label_smoothing: float = 0.0,
    normalizer: float | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """Cross-entropy over the K codes at the masked positions, summed and divided by `normalizer` (default: the
    number of masked positions, i.e. the mean, as the reference). Only the masked rows are upcast to fp32.

    per_sample (ours): each sample's masked positions weighted 1 / (their count), so that every sample counts
    alike whatever its masking ratio (a sample with 5 masked tokens weighs what one with 250 does; by the token mean
    it weighs 1/50 of it); `normalizer` then counts samples (default: the batch size), and the default is the mean
    over samples of each sample's mean."""
    selected = labels != IGNORE
    picked = logits[selected].float()  # (N, K)
    if not per_sample:
        total = F.cross_entropy(picked, labels[selected], reduction="sum", label_smoothing=label_smoothing)
        n = normalizer if normalizer is not None else max(int(selected.sum()), 1)
        return total / n
    counts = selected.flatten(1).sum(1).clamp(min=1)  # (B,) masked positions per sample
    weights = (selected / counts.view(-1, 1, 1).to(torch.float32))[selected]  # (N,) 1 / count of its sample
    terms = F.cross_entropy(picked, labels[selected], reduction="none", label_smoothing=label_smoothing)
    n = normalizer if normalizer is not None else labels.shape[0]
    return (terms * weights).sum() / n
