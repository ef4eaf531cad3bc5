"""Samplers: at each decoding step, which positions are masked after it.

Every step first draws a code for each masked position (`draw_tokens`) and computes how many positions must be
masked after the step (`scheduled_count`, the masking schedule's count). A sampler then chooses those positions.
It sees a `StepView` (the step's token distribution, the probability of each position's token, which positions
were masked before the step, the count, the step index, the step's re-masking temperature and the generator) and
the per-call state it made in `start` (e.g. a spatial order); it returns a (B, L) bool mask and its next state.
Samplers are frozen dataclasses holding their parameters; `SAMPLERS` names them, `make_sampler` builds one.

What every sampler guarantees, after every step but the last (the last reveals everything and asks no sampler):
  - the masked positions lie inside the call's editable set: the positions masked when the call started (so in
    inpainting the tokens outside the mask, and in image to image the tokens the noising left, never change);
  - `halton`, `random`, `remask`: exactly `count` positions are masked;
    `confidence`: `count` positions, fewer only when confidences tie at the cut (the reference's rule; with
    continuous Gumbel noise a tie needs two equal rounded values, likelier in half precision than in fp32);
  - `confidence`, `halton`, `random` keep every token known before the step; `remask` may mask again tokens decoded
    at earlier steps of this call (its purpose), never any other, and never turns a token into another code.

Random numbers: the draw of the codes comes first at every step (all samplers), then the sampler's own: one
uniform per position for `confidence` (Gumbel noise, the reference's order), `random` and `remask` (which draws
exactly what `confidence` draws), none for `halton`, whose optional offset is drawn in `start`, before the first
step. With a list of generators, image b draws everything from generator b, so it gets what a batch of one gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, NamedTuple

import torch

from .schedules import ScheduleLike
from .step import (
    Generators,
    _per_sample,
    draw_tokens,
    gumbel_noise,
    lowest_confidence,
    scheduled_count,
    token_probabilities,
    uniform_noise,
)


class StepView(NamedTuple):
    """What a sampler sees at one step (not the last)."""

    probs: torch.Tensor  # (B, L, K) this step's token distribution (softmax of the guided logits / temperature)
    token_probs: torch.Tensor  # (B, L) probability of each position's token under this step's distribution
    unknown: torch.Tensor  # (B, L) bool: masked before this step
    count: torch.Tensor  # (B, 1) long: how many positions must be masked after it (>= 1)
    step: int  # 0-based index among num_steps
    num_steps: int
    remask_temperature: torch.Tensor | float  # this step's Gumbel temperature (the reference's annealed one)
    generator: Generators


# --- shared selection --------------------------------------------------------------------------------------------


def keep_lowest(
    scores: torch.Tensor,  # (B, L) float
    candidates: torch.Tensor,  # (B, L) bool
    count: torch.Tensor,  # (B, 1) long
) -> torch.Tensor:  # (B, L) bool
    """The `count` candidates of lowest score in each row: exactly `count` of them when a row has that many
    candidates (all of them otherwise); equal scores are ordered by position, so the count never depends on ties."""
    scores = scores.float().masked_fill(~candidates, math.inf)
    order = torch.argsort(scores, dim=-1, stable=True)  # (B, L) positions, lowest score first
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < count) & candidates


# --- the interface -----------------------------------------------------------------------------------------------


class Sampler:
    """The interface: `start` once per call, then `select` at every step but the last.

    start(tokens (B, L) long, grid (h, w), mask_token_id, generator) -> state
    select(view: StepView, state) -> (masked after the step (B, L) bool, next state)
    check(num_steps) raises ValueError when the parameters do not fit a call of `num_steps` steps."""

    name: ClassVar[str] = ""

    def check(self, num_steps: int) -> None:
        pass

    def start(
        self, tokens: torch.Tensor, grid: tuple[int, int], mask_token_id: int, generator: Generators = None
    ) -> Any:
        return None

    def select(self, view: StepView, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError


# --- confidence (the reference) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceSampler(Sampler):
    """MaskGIT's confidence-based choice (Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer"), as
    diffusers' AmusedScheduler computes it: of the positions masked before the step, the `count` whose newly drawn
    token has the lowest log p + remask_temperature * Gumbel noise stay masked. Token-identical to the reference,
    consuming the generator as it does. No parameters (the temperature is the pipeline's `temperature`)."""

    name: ClassVar[str] = "confidence"

    def select(self, view: StepView, state: Any) -> tuple[torch.Tensor, Any]:
        # tokens known before this step are never masked again: they get the highest confidence
        probs = torch.where(view.unknown, view.token_probs, torch.finfo(view.token_probs.dtype).max)
        return lowest_confidence(probs, view.count, view.remask_temperature, view.generator), state


# --- Halton order ------------------------------------------------------------------------------------------------


def radical_inverse(n: torch.Tensor, base: int) -> tuple[torch.Tensor, int]:
    """The base-`base` radical inverse of each n >= 0 (int64 tensor): n's digits mirrored behind the point, as an
    exact fraction numerator / base**digits (numerators (N,), one common denominator)."""
    digits = 1
    while base**digits <= int(n.max()):
        digits += 1
    num, rest = torch.zeros_like(n), n.clone()
    for k in range(digits):  # digit k of n weighs base**-(k + 1)
        num += (rest % base) * base ** (digits - 1 - k)
        rest //= base
    return num, base**digits


@lru_cache(maxsize=32)
def _halton_order(h: int, w: int) -> tuple[int, ...]:
    L = h * w
    n_points = L
    while True:
        n = torch.arange(1, n_points + 1, dtype=torch.int64)
        x, dx = radical_inverse(n, 2)
        y, dy = radical_inverse(n, 3)
        # (n_points,) the flat cell of each point: its row from base 2, its column from base 3
        cells = (x * h // dx) * w + (y * w // dy)
        first = torch.full((L,), n_points, dtype=torch.int64).scatter_reduce_(0, cells, n - 1, reduce="amin")
        if bool((first < n_points).all()):
            return tuple(torch.argsort(first).tolist())  # cells by first visit (the first visits are distinct)
        if n_points > 64 * L + 1_000_000:  # never reached for grids of images: the sequence fills every cell
            raise RuntimeError(f"the 2D Halton sequence left cells of the {h}x{w} grid unvisited")
        n_points *= 2


def halton_order(h: int, w: int) -> torch.Tensor:
    """The positions of an h x w token grid (flattened row-major, (h*w,) long) in the order the 2D Halton sequence
    first visits them. Point n = 1, 2, 3, ... is (radical inverse of n in base 2, in base 3); scaled to the grid it
    falls in row floor(x * h) and column floor(y * w) (exact integer arithmetic). Points falling in a cell already
    visited are skipped, and the sequence runs until every cell is visited. This is how Halton-MaskGIT builds its
    order for a square grid (it starts at n = 1 too); here the grid may be any h x w."""
    return torch.tensor(_halton_order(h, w), dtype=torch.long)


def halton_ranks(order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """order (L,) positions, offsets (B,) long -> ranks (B, L): the place of each position in the order rotated by
    the image's offset (the order's j-th position gets place (j + offset) mod L, a cyclic shift of the sequence)."""
    L = order.numel()
    places = (torch.arange(L, device=offsets.device)[None] + offsets[:, None]) % L  # (B, L), for order[j]
    return torch.empty_like(places).scatter_(1, order.to(offsets.device).expand_as(places), places)


def random_offsets(batch: int, length: int, generator: Generators, device: torch.device | str) -> torch.Tensor:
    """(batch,) long offsets uniform in [0, length): one draw of `batch` values from a single generator, or one value
    from each generator of a list."""
    generators = _per_sample(generator, batch)
    if generators is None:
        where = device if generator is None else generator.device
        return torch.randint(length, (batch,), generator=generator, device=where).to(device)
    return torch.cat([torch.randint(length, (1,), generator=g, device=g.device).to(device) for g in generators])


@dataclass(frozen=True)
class HaltonSampler(Sampler):
    """Halton-MaskGIT's spatial order (Besnier et al. 2025, "Halton Scheduler for Masked Generative Image
    Transformer", github.com/valeoai/Halton-MaskGIT): positions are revealed in the order of a 2D Halton sequence
    over the token grid (`halton_order`), whatever the model's confidence, so each step's tokens are spread evenly
    over the image and far from each other. Of the positions masked before a step, the `count` latest in the order
    stay masked; from an all-masked grid, step i reveals the order's first L - count_i positions.

    Halton-MaskGIT reveals int(L * (1 - arccos(r) / (pi / 2))) tokens by progress r (at least one more per step),
    its own arccos schedule; here the count is the masking schedule's, as for every sampler (masking_schedule=
    "arccos" comes closest to Halton-MaskGIT's).

    random_offset: rotate each image's order by an offset uniform in [0, L), drawn once per call from that image's
        generator before the first step (Halton-MaskGIT's `randomize`, a cyclic shift of the sequence); off: every
        image uses the same order and this sampler draws no random number beyond the codes."""

    random_offset: bool = False
    name: ClassVar[str] = "halton"

    def __post_init__(self):
        if not isinstance(self.random_offset, bool):
            raise TypeError(f"random_offset must be True or False, got {self.random_offset!r}")

    def start(
        self, tokens: torch.Tensor, grid: tuple[int, int], mask_token_id: int, generator: Generators = None
    ) -> torch.Tensor:
        B, L = tokens.shape
        order = halton_order(*grid)  # (L,)
        if self.random_offset:
            offsets = random_offsets(B, L, generator, tokens.device)
        else:
            offsets = torch.zeros(B, dtype=torch.long, device=tokens.device)
        return halton_ranks(order, offsets)  # (B, L), the state: each position's place in its image's order

    def select(self, view: StepView, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return keep_lowest(-state, view.unknown, view.count), state  # the highest places stay masked


# --- uniformly random order --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomSampler(Sampler):
    """A uniformly random order, independent of the model (the random-order baseline of MaskGIT-style decoding,
    against which confidence and Halton orders are compared): of the positions masked before a step, `count` chosen uniformly at random stay masked (the lowest
    of one uniform draw per position). Choosing uniformly at each step is the same as following one uniformly random
    permutation of the grid. No parameters."""

    name: ClassVar[str] = "random"

    def select(self, view: StepView, state: Any) -> tuple[torch.Tensor, Any]:
        u = uniform_noise(view.token_probs, view.generator)  # (B, L)
        return keep_lowest(u, view.unknown, view.count), state


# --- ReMDM-style re-masking --------------------------------------------------------------------------------------


REMASK_STRATEGIES = ("cap", "rescale")
REMASK_CHOICES = ("confidence", "random")


class RemaskState(NamedTuple):
    editable: torch.Tensor  # (B, L) bool: masked when the call started, the only positions ever re-masked
    confidence: torch.Tensor  # (B, L) fp32: log p of each decoded token when it was revealed (0 elsewhere)


def remask_count(
    decoded: torch.Tensor,  # (B, 1) long: tokens decoded at earlier steps of this call
    count: torch.Tensor,  # (B, 1) long: positions to be masked after this step
    eta: float,
    strategy: str,
) -> torch.Tensor:  # (B, 1) long, at most `count`
    """How many decoded tokens to mask again: floor(sigma * decoded), with ReMDM's bound
    sigma_max = min(1, count / decoded) (re-masking never exceeds what the schedule leaves masked) and
    sigma = min(eta, sigma_max) ("cap") or eta * sigma_max ("rescale")."""
    decoded64, count64 = decoded.double(), count.double()
    sigma_max = torch.where(decoded > 0, (count64 / decoded64.clamp(min=1)).clamp(max=1), 1.0)
    sigma = sigma_max.clamp(max=eta) if strategy == "cap" else eta * sigma_max
    return torch.minimum((sigma * decoded64).floor().long(), count)


@dataclass(frozen=True)
class RemaskSampler(Sampler):
    """ReMDM-style re-masking (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling",
    github.com/kuleshov-group/remdm): at each step some tokens decoded at earlier steps are masked again, so later
    steps, seeing more of the image, can redraw them (inference-time correction).

    At a step with D decoded tokens and a scheduled count n, r = `remask_count(D, n, eta, strategy)` decoded tokens
    are masked again and n - r of the positions masked before the step stay masked (the lowest-confidence ones, by
    the reference's rule), so exactly n positions are masked after the step, as the schedule says, and the step
    reveals r more tokens than it would without re-masking. Only positions masked when the call started are ever
    re-masked (in inpainting: inside the mask; in image to image: the tokens the noising masked).

    eta: ReMDM's eta, the fraction of decoded tokens re-masked per step (at most the bound sigma_max, see
        `remask_count`), in [0, 1]; 0 computes exactly what `confidence` computes.
    strategy: how eta becomes the step's fraction sigma: "cap" (ReMDM-cap: min(eta, sigma_max)) or "rescale"
        (ReMDM-rescale: eta * sigma_max).
    choose: which decoded tokens: "confidence" (those of lowest log p at the step that revealed them, plus the
        step's remask_temperature * Gumbel noise; ReMDM-conf's idea of re-masking the least confident first, where
        ReMDM-conf samples them with weights softmax(-p) and sets no count of its own) or "random" (uniformly, as
        ReMDM-cap and -rescale do). Either way the noise is the one draw per position `confidence` makes.
    steps: (start, end): re-mask only at the 0-based steps start <= i < end (like ReMDM-loop's window of
        re-masking; unlike it, the masking schedule is not held still inside the window); None: at every step.
    The defaults are a starting point, not tuned values."""

    eta: float = 0.1
    strategy: str = "cap"
    choose: str = "confidence"
    steps: tuple[int, int] | None = None
    name: ClassVar[str] = "remask"

    def __post_init__(self):
        if (
            isinstance(self.eta, bool)
            or not isinstance(self.eta, (int, float))
            or not math.isfinite(self.eta)
            or not 0 <= self.eta <= 1
        ):
            raise ValueError(f"remask eta must be a finite number in [0, 1], got {self.eta!r}")
        if self.strategy not in REMASK_STRATEGIES:
            raise ValueError(f"unknown remask strategy {self.strategy!r}; choose one of {', '.join(REMASK_STRATEGIES)}")
        if self.choose not in REMASK_CHOICES:
            raise ValueError(f"unknown remask choice {self.choose!r}; choose one of {', '.join(REMASK_CHOICES)}")
        if self.steps is not None:
            object.__setattr__(self, "steps", check_interval(self.steps, "remask steps"))

    def check(self, num_steps: int) -> None:
        if self.steps is not None:
            check_interval(self.steps, "remask steps", num_steps)

    def active(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def start(
        self, tokens: torch.Tensor, grid: tuple[int, int], mask_token_id: int, generator: Generators = None
    ) -> RemaskState:
        editable = tokens == mask_token_id  # (B, L)
        return RemaskState(editable, torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device))

    def select(self, view: StepView, state: RemaskState) -> tuple[torch.Tensor, RemaskState]:
        unknown, count, t = view.unknown, view.count, view.remask_temperature
        noise = gumbel_noise(view.token_probs, view.generator)  # (B, L), what `confidence` draws
        log_p = torch.log(view.token_probs.clamp(1e-20))  # (B, L)
        decoded = state.editable & ~unknown  # (B, L) revealed at earlier steps of this call
        if self.active(view.step) and self.eta > 0:
            r = remask_count(decoded.sum(dim=-1, keepdim=True), count, self.eta, self.strategy)  # (B, 1)
            score = state.confidence + t * noise if self.choose == "confidence" else noise
            again = keep_lowest(score, decoded, r)
        else:
            r, again = torch.zeros_like(count), torch.zeros_like(unknown)
        stay = keep_lowest(log_p + t * noise, unknown, count - r)  # the reference's confidence rule
        revealed = unknown & ~stay
        confidence = torch.where(revealed, log_p.float(), state.confidence)
        return stay | again, RemaskState(state.editable, confidence)


# --- registry and the generic step -------------------------------------------------------------------------------


SAMPLERS: dict[str, type[Sampler]] = {
    s.name: s for s in (ConfidenceSampler, HaltonSampler, RandomSampler, RemaskSampler)
}


def make_sampler(spec: str | Sampler = "confidence", **params) -> Sampler:
    """A sampler from its name (and its parameters as keywords, e.g. make_sampler("remask", eta=0.2)), or the given
    Sampler itself."""
    if isinstance(spec, Sampler):
        if params:
            raise TypeError(f"parameters {sorted(params)} given with a built sampler; pass them to its constructor")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a sampler is a name or a sampling.Sampler, got {type(spec).__name__}")
    if spec not in SAMPLERS:
        raise ValueError(f"unknown sampler {spec!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[spec](**params)


def check_interval(interval, what: str, num_steps: int | None = None) -> tuple[int, int]:
    """(start, end) integers with 0 <= start <= end (<= num_steps when given), or a ValueError naming `what`."""
    try:
        start, end = interval
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (start, end) pair of step indices, got {interval!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)):
        raise ValueError(f"{what} must be integers (0-based step indices), got {interval!r}")
    if not 0 <= start <= end:
        raise ValueError(f"{what} {interval!r} must satisfy 0 <= start <= end")
    if num_steps is not None and end > num_steps:
        raise ValueError(f"{what} {interval!r} ends after the last step: it must lie inside [0, {num_steps}]")
    return start, end


class StepResult(NamedTuple):
    tokens: torch.Tensor  # (B, L) after the step, mask_token_id where masked
    predicted: torch.Tensor  # (B, L) the full sample drawn at this step
    state: Any  # the sampler's state for the next step


def sample_step(
    logits: torch.Tensor,  # (B, L, K) over the codebook
    tokens: torch.Tensor,  # (B, L) long; mask_token_id where unknown
    step: int,  # 0-based index of this step among num_steps
    num_steps: int,
    *,
    sampler: Sampler,
    state: Any,  # from sampler.start, then from the previous step
    mask_token_id: int,
    schedule: ScheduleLike = "cosine",
    remask_temperature: torch.Tensor | float = 1.0,
    generator: Generators = None,
    starting_mask_ratio: float | torch.Tensor = 1.0,
    num_tokens: int | torch.Tensor | None = None,
    sampling_temperature: float = 1.0,
) -> StepResult:
    """One decoding step with any sampler; arguments as `decode_step`, which is this step with `ConfidenceSampler`
    (the same tokens, the same random numbers). The codes are drawn first; on the last step they are the result;
    otherwise the sampler chooses the positions masked after the step."""
    unknown = tokens == mask_token_id  # (B, L)
    probs = token_probabilities(logits, sampling_temperature)  # (B, L, K)
    predicted = torch.where(unknown, draw_tokens(probs, generator), tokens)
    if step == num_steps - 1:
        return StepResult(predicted, predicted, state)
    count = scheduled_count(unknown, step, num_steps, schedule, starting_mask_ratio, num_tokens)  # (B, 1)
    token_probs = probs.gather(-1, predicted[..., None])[..., 0]  # (B, L)
    view = StepView(probs, token_probs, unknown, count, step, num_steps, remask_temperature, generator)
    masked, state = sampler.select(view, state)
    return StepResult(torch.where(masked, mask_token_id, predicted), predicted, state)
