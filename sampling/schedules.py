"""Schedules of MaskGIT-style decoding: how many tokens stay masked after each step, the re-masking temperature of
each step, the sampling (token) temperature of each step, and the classifier-free guidance scale of each step.

Step `i` of `N` (0-based) has progress r = (i + 1) / N. A masking schedule maps r in [0, 1] to the fraction of
tokens still masked after that step: 1 at r = 0, 0 at r = 1.

The reference (diffusers' AmusedScheduler) computes r as an integer tensor divided by N, i.e. in fp32 on the
logits' device, then cos(r * pi / 2). fp32 matters: cos(8/12 * pi/2) in fp32 is just below 0.5, so 256 tokens
floor to 127 and not 128. Everything here keeps that dtype, device and order of operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("cosine", "linear", "arccos", "power")


@dataclass(frozen=True)
class MaskingSchedule:
    """A masking schedule: `schedule(r)` is the fraction of tokens left masked at progress r (a float tensor).

    - "cosine": cos(r * pi / 2) (the reference's default; MaskGIT's choice)
    - "linear": 1 - r (the reference's inpainting schedule)
    - "arccos": arccos(r) / (pi / 2)
    - "power": 1 - r ** exponent (MaskGIT's "square" is exponent 2, "cubic" 3, "square root" 0.5)
    """

    name: str = "cosine"
    exponent: float = 2.0  # used by "power" only

    def __post_init__(self):
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(f"unknown masking schedule {self.name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
        if self.name == "power" and not self.exponent > 0:
            raise ValueError(f"the power schedule needs an exponent > 0, got {self.exponent}")

    @classmethod
    def parse(cls, spec: "ScheduleLike") -> "MaskingSchedule":
        """'cosine', 'linear', 'arccos', 'power' (exponent 2), 'power:3', or a MaskingSchedule."""
        if isinstance(spec, MaskingSchedule):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a masking schedule is a name or a MaskingSchedule, got {type(spec).__name__}")
        name, _, exponent = spec.partition(":")
        if exponent:
            if name != "power":
                raise ValueError(f"only the power schedule takes an exponent, got {spec!r}")
            try:
                return cls("power", float(exponent))
            except ValueError as e:
                raise ValueError(f"bad power schedule {spec!r}: {e}") from None
        return cls(name)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if self.name == "cosine":
            return torch.cos(r * math.pi / 2)
        if self.name == "linear":
            return 1 - r
        if self.name == "arccos":
            return torch.arccos(r) / (math.pi / 2)
        return 1 - r**self.exponent


ScheduleLike = str | MaskingSchedule


def progress(step: int, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(step + 1) / num_steps as a 0-dim fp32 tensor, computed as the reference does (an integer tensor / int)."""
    return torch.tensor(step + 1, device=device) / num_steps


def mask_ratio(
    schedule: ScheduleLike, step: int, num_steps: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fraction of tokens left masked after step `step` of `num_steps` (0-dim fp32 tensor).
    `step = -1` gives the ratio before the first step (1 for every schedule)."""
    return MaskingSchedule.parse(schedule)(progress(step, num_steps, device))


def tokens_to_mask(
    ratio: torch.Tensor,  # fraction to leave masked: 0-dim or (B, 1)
    num_tokens: int | torch.Tensor,  # what the ratio is a fraction of: the sequence length, or (B, 1) counts
    masked_now: torch.Tensor,  # (B,) or (B, 1) number of tokens masked before this step
) -> torch.Tensor:  # (B, 1) long
    """How many tokens to mask again after a step: floor(num_tokens * ratio), at most one fewer than are masked now
    (so every step reveals at least one), and at least 1 (the reference's rule; only the last step masks none, and
    the caller handles it)."""
    n = (num_tokens * ratio).floor()
    n = torch.minimum(masked_now.reshape(-1, 1) - 1, n)
    return n.clamp(min=1).long()


def remask_temperatures(
    num_steps: int,
    temperature: float | Sequence[float] = (2, 0),
    device: torch.device | str | None = None,
) -> torch.Tensor:  # (num_steps,) fp32
    """Re-masking (Gumbel) temperature of every step: linspace(t0, t1, N) for a pair, linspace(T, 0.01, N) for a
    single value, as the reference."""
    if isinstance(temperature, (tuple, list)):
        if len(temperature) != 2:
            raise ValueError(f"temperature must be a number or a (start, end) pair, got {temperature!r}")
        return torch.linspace(temperature[0], temperature[1], num_steps, device=device)
    return torch.linspace(temperature, 0.01, num_steps, device=device)


GUIDANCE_SCHEDULES = ("constant", "linear", "cosine", "power-cosine")


@dataclass(frozen=True)
class GuidanceSchedule:
    """How the classifier-free guidance scale changes over the steps: step i of N uses 1 + (scale - 1) * w(r) with
    r = (i + 1) / N, so every ramp reaches `scale` at the last step.

    - "constant": w = 1 at every step (the reference)
    - "linear": w = r
    - "cosine": w = 1 - cos(r * pi / 2)
    - "power-cosine": w = (1 - cos(pi * r ** exponent)) / 2, MaskBit's guidance annealing (Weber et al. 2024,
      "MaskBit: Embedding-free Image Generation via Bit Tokens", github.com/markweberdev/maskbit). It stays near no
      guidance for longer the larger the exponent, then rises steeply. MaskBit measures progress as i / N (so its
      first step is unguided and its last not fully guided) and writes guidance as cond + s * (cond - uncond);
      here progress is (i + 1) / N, as for the other ramps, and the scale is ours (1 = no guidance). The default
      exponent 3 is the one of MaskBit's published 14-bit generator configuration.

    The MUSE paper's observation motivates the ramps: strong guidance early costs diversity."""

    name: str = "constant"
    exponent: float = 3.0  # used by "power-cosine" only

    def __post_init__(self):
        if self.name not in GUIDANCE_SCHEDULES:
            raise ValueError(f"unknown guidance schedule {self.name!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}")
        if self.name == "power-cosine" and not (math.isfinite(self.exponent) and self.exponent > 0):
            raise ValueError(f"the power-cosine guidance schedule needs a finite exponent > 0, got {self.exponent}")

    @classmethod
    def parse(cls, spec: "GuidanceScheduleLike") -> "GuidanceSchedule":
        """'constant', 'linear', 'cosine', 'power-cosine' (exponent 3), 'power-cosine:2.5', or a GuidanceSchedule."""
        if isinstance(spec, GuidanceSchedule):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a guidance schedule is a name or a GuidanceSchedule, got {type(spec).__name__}")
        name, _, exponent = spec.partition(":")
        if exponent:
            if name != "power-cosine":
                raise ValueError(f"only the power-cosine guidance schedule takes an exponent, got {spec!r}")
            try:
                return cls(name, float(exponent))
            except ValueError as e:
                raise ValueError(f"bad guidance schedule {spec!r}: {e}") from None
        return cls(name)

    def weight(self, r: float) -> float:
        """w(r) in [0, 1]: 0 is no guidance, 1 the full scale."""
        if self.name == "constant":
            return 1.0
        if self.name == "linear":
            return r
        if self.name == "cosine":
            return 1 - math.cos(r * math.pi / 2)
        return (1 - math.cos(math.pi * r**self.exponent)) / 2


GuidanceScheduleLike = str | GuidanceSchedule


def guidance_scales(num_steps: int, scale: float, schedule: GuidanceScheduleLike = "constant") -> list[float]:
    """Classifier-free guidance scale of every step (Python floats, so the loop never syncs with the device); see
    `GuidanceSchedule` for the ramps. "constant" uses `scale` at every step (the reference)."""
    schedule = GuidanceSchedule.parse(schedule)
    if schedule.name == "constant":
        return [float(scale)] * num_steps
    return [1 + (scale - 1) * schedule.weight((i + 1) / num_steps) for i in range(num_steps)]


def token_temperatures(num_steps: int, temperature: float | Sequence[float] = 1.0) -> list[float]:
    """Sampling (token) temperature of every step, dividing the logits before the draw (Python floats).

    A number is used at every step (1 is the reference). A (start, end) pair is annealed linearly from `start` at
    step 0 to `end` at step N - 1, the steps spaced as `remask_temperatures` spaces its pair (a single step uses
    `start`). MaskBit's optional annealing is a linear ramp of this kind (from 1.3 towards 0.5 over its progress);
    here the two ends are the caller's. Image to image and inpainting, which run the last steps only, use those
    steps' temperatures."""
    if isinstance(temperature, (tuple, list)):
        if len(temperature) != 2:
            raise ValueError(f"sampling temperature must be a number or a (start, end) pair, got {temperature!r}")
        start, end = (float(t) for t in temperature)
        if num_steps == 1:
            return [start]
        return [start + (end - start) * i / (num_steps - 1) for i in range(num_steps)]
    return [float(temperature)] * num_steps
