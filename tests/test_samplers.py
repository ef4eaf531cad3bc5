"""`sampling.samplers`: every sampler's guarantees (masked counts, known tokens, per-image generators), the Halton
order against a Halton sequence computed here independently, the re-masking counts, and the new schedules
(power-cosine guidance, token-temperature annealing). Pure tensor tests: random logits, no model."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import sampling
from sampling import ConfidenceSampler, HaltonSampler, RandomSampler, RemaskSampler

MASK_ID = 71  # the tiny configs' mask id (vocab 72, codebook 64)
K = 64
GRID = (6, 8)  # a non-square grid: rows and columns must not be confused
L = GRID[0] * GRID[1]
N = 10

SAMPLERS = {
    "confidence": ConfidenceSampler(),
    "halton": HaltonSampler(),
    "halton-offset": HaltonSampler(random_offset=True),
    "random": RandomSampler(),
    "remask-cap": RemaskSampler(eta=0.3),
    "remask-rescale-random": RemaskSampler(eta=0.6, strategy="rescale", choose="random"),
    "remask-window": RemaskSampler(eta=1.0, steps=(3, 7)),
}
REMASKING = {name for name, s in SAMPLERS.items() if isinstance(s, RemaskSampler)}


def start_tokens(kind: str, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """(B, L) start tokens: all masked (text to image), or known codes with a masked region (inpainting-like, the
    region differing per image)."""
    if kind == "all-masked":
        return torch.full((batch, L), MASK_ID)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, K, (batch, L), generator=g)
    region = torch.rand(batch, L, generator=g) < 0.5
    region[:, 0] = True  # at least one masked position per image
    return torch.where(region, MASK_ID, tokens)


def expected_count(masked_before: int, num_tokens: int, step: int) -> int:
    """The count the cosine schedule prescribes after `step`, written out here: floor(num_tokens * cos(pi/2 * r))
    in fp32, at most one fewer than are masked, at least 1."""
    r = torch.tensor(step + 1) / N  # fp32, as the reference
    n = math.floor(float(num_tokens * torch.cos(r * math.pi / 2)))
    return max(1, min(masked_before - 1, n))


def decode(sampler, tokens, generator, logit_seed=0, num_tokens=None):
    """Run all N steps on random logits; the tokens after every step (a list of (B, L))."""
    g = torch.Generator().manual_seed(logit_seed)
    temps = sampling.remask_temperatures(N)
    state = sampler.start(tokens, GRID, MASK_ID, generator)
    history = []
    for i in range(N):
        logits = torch.randn(tokens.shape[0], L, K, generator=g) * 2
        tokens, predicted, state = sampling.sample_step(
            logits,
            tokens,
            i,
            N,
            sampler=sampler,
            state=state,
            mask_token_id=MASK_ID,
            remask_temperature=temps[i],
            generator=generator,
            num_tokens=num_tokens,
        )
        history.append(tokens)
    return history


# --- what every sampler guarantees -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["all-masked", "region"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_leaves_the_scheduled_count_masked_and_none_at_the_end(name, kind):
    tokens = start_tokens(kind)
    # a count that is a fraction of each image's masked region (the pipeline's mask_count_base="masked")
    region = (tokens == MASK_ID).sum(-1, keepdim=True)
    history = decode(
        SAMPLERS[name], tokens, torch.Generator().manual_seed(1), num_tokens=region if kind == "region" else None
    )
    before = (tokens == MASK_ID).sum(-1).tolist()
    for i, after_tokens in enumerate(history[:-1]):
        after = (after_tokens == MASK_ID).sum(-1).tolist()
        bases = region.flatten().tolist() if kind == "region" else [L] * len(before)
        assert after == [expected_count(m, n, i) for m, n in zip(before, bases)], f"step {i}"
        before = after
    assert not (history[-1] == MASK_ID).any()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_known_tokens_never_change(name):
    tokens = start_tokens("region")
    editable = tokens == MASK_ID
    history = decode(SAMPLERS[name], tokens, torch.Generator().manual_seed(2))
    previous = tokens
    for after in history:
        # tokens known when the call started: never touched, by any sampler
        assert torch.equal(after[~editable], tokens[~editable])
        known = previous != MASK_ID
        if name in REMASKING:  # a decoded token may be masked again, never turned into another code
            assert bool(((after == previous) | (after == MASK_ID))[known].all())
        else:
            assert torch.equal(after[known], previous[known])
        previous = after


def test_remask_does_mask_decoded_tokens_again_and_only_inside_the_region():
    tokens = start_tokens("region", seed=4)
    editable = tokens == MASK_ID
    history = decode(RemaskSampler(eta=0.5), tokens, torch.Generator().manual_seed(3))
    remasked = torch.zeros_like(editable)
    for before, after in zip([tokens] + history, history):
        remasked |= (before != MASK_ID) & (after == MASK_ID)
    assert remasked.any() and not (remasked & ~editable).any()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_list_of_generators_gives_each_image_the_single_image_result(name):
    tokens = start_tokens("region", batch=3)
    seeds = (10, 11, 12)
    batch = decode(SAMPLERS[name], tokens, [torch.Generator().manual_seed(s) for s in seeds])[-1]
    for b, seed in enumerate(seeds):
        # the same logits for image b: decode a batch of one whose logit rows are row b's
        single = decode_row(SAMPLERS[name], tokens, b, torch.Generator().manual_seed(seed))
        assert torch.equal(batch[b], single)
    if name != "halton":  # the plain Halton order is the same for every image; the rest draw from the generators
        others = decode(SAMPLERS[name], tokens, [torch.Generator().manual_seed(s) for s in (20, 21, 22)])[-1]
        assert not torch.equal(batch, others)


def decode_row(sampler, tokens, b, generator, logit_seed=0):
    """`decode` for image b alone, with the logits image b gets in the batch."""
    g = torch.Generator().manual_seed(logit_seed)
    temps = sampling.remask_temperatures(N)
    row = tokens[b : b + 1]
    state = sampler.start(row, GRID, MASK_ID, generator)
    for i in range(N):
        logits = (torch.randn(tokens.shape[0], L, K, generator=g) * 2)[b : b + 1]
        row, _, state = sampling.sample_step(
            logits,
            row,
            i,
            N,
            sampler=sampler,
            state=state,
            mask_token_id=MASK_ID,
            remask_temperature=temps[i],
            generator=generator,
        )
    return row[0]


# --- confidence: the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 4, N - 1])
def test_confidence_sample_step_is_decode_step(step):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, L, K, generator=g) * 3
    tokens = start_tokens("region")
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    temp = sampling.remask_temperatures(N)[step]
    ours = sampling.sample_step(
        logits,
        tokens,
        step,
        N,
        sampler=ConfidenceSampler(),
        state=None,
        mask_token_id=MASK_ID,
        remask_temperature=temp,
        generator=g1,
    )
    reference, predicted = sampling.decode_step(
        logits, tokens, step, N, mask_token_id=MASK_ID, remask_temperature=temp, generator=g2
    )
    assert torch.equal(ours.tokens, reference) and torch.equal(ours.predicted, predicted)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_remask_with_eta_zero_is_confidence():
    tokens = start_tokens("all-masked")
    plain = decode(ConfidenceSampler(), tokens, torch.Generator().manual_seed(5))
    remask = decode(RemaskSampler(eta=0.0), tokens, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(plain, remask))


# --- Halton --------------------------------------------------------------------------------------------------------


def radical_inverse_by_hand(n: int, base: int) -> Fraction:
    """n's base-`base` digits mirrored behind the point, exactly."""
    value, weight = Fraction(0), Fraction(1, base)
    while n:
        n, digit = divmod(n, base)
        value += digit * weight
        weight /= base
    return value


def halton_order_by_hand(h: int, w: int) -> list[int]:
    order, seen, n = [], set(), 0
    while len(order) < h * w:
        n += 1
        cell = math.floor(radical_inverse_by_hand(n, 2) * h) * w + math.floor(radical_inverse_by_hand(n, 3) * w)
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
    return order


def test_radical_inverse_known_values():
    n = torch.arange(1, 9)
    num, den = sampling.radical_inverse(n, 2)
    assert [Fraction(int(a), den) for a in num] == [
        Fraction(*f) for f in [(1, 2), (1, 4), (3, 4), (1, 8), (5, 8), (3, 8), (7, 8), (1, 16)]
    ]
    num, den = sampling.radical_inverse(n, 3)
    assert [Fraction(int(a), den) for a in num] == [
        Fraction(*f) for f in [(1, 3), (2, 3), (1, 9), (4, 9), (7, 9), (2, 9), (5, 9), (8, 9)]
    ]
    assert all(radical_inverse_by_hand(int(k), 3) == Fraction(int(a), den) for k, a in zip(n, num))


def test_halton_order_known_values():
    # a 2 x 3 grid: the first six points (1/2, 1/3), (1/4, 2/3), (3/4, 1/9), (1/8, 4/9), (5/8, 7/9), (3/8, 2/9)
    # fall in cells (1, 1), (0, 2), (1, 0), (0, 1), (1, 2), (0, 0): one per cell
    assert sampling.halton_order(2, 3).tolist() == [4, 2, 3, 1, 5, 0]


@pytest.mark.parametrize("grid", [(4, 4), (6, 8), (8, 6), (16, 16), (5, 7), (32, 32)])
def test_halton_order_equals_an_independent_halton_sequence(grid):
    order = sampling.halton_order(*grid)
    assert order.tolist() == halton_order_by_hand(*grid)
    assert sorted(order.tolist()) == list(range(grid[0] * grid[1]))  # a permutation of the grid


def test_halton_reveals_the_order_prefix():
    tokens = start_tokens("all-masked", batch=2)
    order = sampling.halton_order(*GRID)
    for after in decode(HaltonSampler(), tokens, torch.Generator().manual_seed(0))[:-1]:
        for row in after:
            revealed = (row != MASK_ID).nonzero().flatten().sort().values
            assert torch.equal(revealed, order[: len(revealed)].sort().values)


def test_halton_offset_rotates_each_image_order_by_an_offset_from_its_generator():
    tokens = start_tokens("all-masked", batch=2)
    order = sampling.halton_order(*GRID)
    seeds = (3, 5)  # offsets 10 and 35 of 48
    ranks = HaltonSampler(random_offset=True).start(
        tokens, GRID, MASK_ID, [torch.Generator().manual_seed(s) for s in seeds]
    )
    for b, seed in enumerate(seeds):
        offset = int(torch.randint(L, (1,), generator=torch.Generator().manual_seed(seed)))
        rotated = torch.roll(order, offset)  # the sequence shifted cyclically: position order[j] comes at j + offset
        assert torch.equal(ranks[b][rotated], torch.arange(L))
    assert not torch.equal(ranks[0], ranks[1])
    plain = HaltonSampler().start(tokens, GRID, MASK_ID, None)
    assert torch.equal(plain[0][order], torch.arange(L)) and torch.equal(plain[0], plain[1])


def test_plain_halton_is_independent_of_the_confidence():
    # the same positions are revealed whatever the logits (only the drawn codes differ)
    tokens = start_tokens("all-masked", batch=1)
    a = decode(HaltonSampler(), tokens, torch.Generator().manual_seed(0), logit_seed=1)
    b = decode(HaltonSampler(), tokens, torch.Generator().manual_seed(0), logit_seed=2)
    assert all(torch.equal(x == MASK_ID, y == MASK_ID) for x, y in zip(a, b))
    assert not torch.equal(a[-1], b[-1])


# --- random order ----------------------------------------------------------------------------------------------


def view(token_probs, unknown, count, generator, step=3, temperature=1.0):
    probs = torch.full((*token_probs.shape, K), 1 / K)  # not read by these samplers
    return sampling.StepView(probs, token_probs, unknown, count, step, N, temperature, generator)


def test_random_order_ignores_the_confidence():
    unknown = torch.ones(2, L, dtype=torch.bool)
    count = torch.tensor([[20], [20]])
    p1, p2 = torch.rand(2, L), torch.rand(2, L)
    m1, _ = RandomSampler().select(view(p1, unknown, count, torch.Generator().manual_seed(0)), None)
    m2, _ = RandomSampler().select(view(p2, unknown, count, torch.Generator().manual_seed(0)), None)
    m3, _ = RandomSampler().select(view(p1, unknown, count, torch.Generator().manual_seed(1)), None)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_random_order_is_uniform_over_positions():
    unknown = torch.ones(1, L, dtype=torch.bool)
    count = torch.tensor([[12]])
    g = torch.Generator().manual_seed(0)
    trials = 2000
    hits = sum(
        RandomSampler().select(view(torch.rand(1, L), unknown, count, g), None)[0][0].float() for _ in range(trials)
    )
    p = 12 / L  # each position stays masked with probability count / L
    sd = math.sqrt(p * (1 - p) / trials)
    assert bool(((hits / trials - p).abs() < 5 * sd).all())


# --- re-masking ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["cap", "rescale"])
def test_remask_count_formula(strategy):
    eta = 0.3
    for decoded, count in [(0, 5), (10, 40), (40, 10), (100, 2), (7, 7), (50, 50)]:
        sigma_max = 1.0 if decoded == 0 else min(1.0, count / decoded)
        sigma = min(eta, sigma_max) if strategy == "cap" else eta * sigma_max
        expected = min(count, math.floor(sigma * decoded))
        got = sampling.remask_count(torch.tensor([[decoded]]), torch.tensor([[count]]), eta, strategy)
        assert int(got) == expected, (decoded, count)
    # with eta 1, "cap" re-masks as many decoded tokens as the schedule leaves masked, never more
    assert int(sampling.remask_count(torch.tensor([[40]]), torch.tensor([[10]]), 1.0, "cap")) == 10


def test_remask_masks_the_scheduled_number_of_lowest_confidence_decoded_tokens():
    # one step by hand: 30 decoded tokens with known decode-time confidences, 10 still masked, 6 to stay masked
    B = 1
    unknown = torch.zeros(B, L, dtype=torch.bool)
    unknown[0, :10] = True
    editable = torch.zeros(B, L, dtype=torch.bool)
    editable[0, :40] = True  # positions 40.. were known at the start: never re-masked
    confidence = torch.zeros(B, L)
    confidence[0, 10:40] = torch.linspace(-1, -30, 30)  # position 39 is the least confident
    state = sampling.RemaskState(editable, confidence)
    count = torch.tensor([[6]])
    sampler = RemaskSampler(eta=0.1)  # r = floor(min(0.1, 6 / 30) * 30) = 3
    masked, new_state = sampler.select(
        view(torch.rand(B, L), unknown, count, torch.Generator().manual_seed(0), temperature=0.0), state
    )
    assert int(masked.sum()) == 6
    assert masked[0, 37:40].all() and int(masked[0, 10:40].sum()) == 3 and not masked[0, 40:].any()
    assert int(masked[0, :10].sum()) == 3
    # the 7 positions revealed now have their confidence recorded; the re-masked ones keep theirs until redrawn
    revealed = unknown & ~masked
    assert not torch.equal(new_state.confidence[revealed], confidence[revealed])


def test_remask_only_inside_its_steps():
    tokens = start_tokens("all-masked")
    sampler = RemaskSampler(eta=1.0, steps=(3, 7))
    history = decode(sampler, tokens, torch.Generator().manual_seed(6))
    for i, (before, after) in enumerate(zip([tokens] + history, history)):
        remasked = bool(((before != MASK_ID) & (after == MASK_ID)).any())
        assert remasked == (3 <= i < 7), i


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eta=1.5), "eta"),
        (dict(eta=float("nan")), "eta"),
        (dict(strategy="loop"), "strategy.*cap, rescale"),
        (dict(choose="entropy"), "choice.*confidence, random"),
        (dict(steps=(5, 2)), "start <= end"),
        (dict(steps=(0.5, 2)), "integers"),
        (dict(steps=3), "pair"),
    ],
)
def test_bad_remask_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RemaskSampler(**kwargs)


def test_remask_steps_must_fit_the_call():
    RemaskSampler(steps=(2, 12)).check(12)
    with pytest.raises(ValueError, match=r"inside \[0, 12\]"):
        RemaskSampler(steps=(2, 13)).check(12)


# --- registry ----------------------------------------------------------------------------------------------------


def test_make_sampler():
    assert sampling.make_sampler("halton") == HaltonSampler()
    assert sampling.make_sampler("remask", eta=0.2) == RemaskSampler(eta=0.2)
    built = HaltonSampler(random_offset=True)
    assert sampling.make_sampler(built) is built
    assert set(sampling.SAMPLERS) == {"confidence", "halton", "random", "remask"}
    with pytest.raises(ValueError, match="unknown sampler 'maskgit'; choose one of confidence, halton, random, remask"):
        sampling.make_sampler("maskgit")


# --- schedules: power-cosine guidance, token temperature ---------------------------------------------------------


@pytest.mark.parametrize("exponent", [3.0, 1.0, 0.5])
def test_power_cosine_guidance(exponent):
    scale, steps = 8.0, 12
    spec = "power-cosine" if exponent == 3.0 else f"power-cosine:{exponent}"
    scales = sampling.guidance_scales(steps, scale, spec)
    for i, s in enumerate(scales):
        r = (i + 1) / steps
        assert s == pytest.approx(1 + (scale - 1) * (1 - math.cos(math.pi * r**exponent)) / 2)
    assert scales[-1] == pytest.approx(scale) and all(b > a for a, b in zip(scales, scales[1:]))
    assert sampling.guidance_scales(steps, scale, sampling.GuidanceSchedule("power-cosine", exponent)) == scales


def test_a_larger_power_cosine_exponent_delays_guidance():
    low, high = sampling.guidance_scales(12, 8.0, "power-cosine:1"), sampling.guidance_scales(12, 8.0, "power-cosine:4")
    assert all(h < lo for h, lo in zip(high[:-1], low[:-1]))


@pytest.mark.parametrize(
    "bad", ["power-cosine:0", "power-cosine:-2", "power-cosine:inf", "power-cosine:x", "cosine:2", "exp"]
)
def test_bad_guidance_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="guidance schedule"):
        sampling.GuidanceSchedule.parse(bad)


def test_token_temperatures():
    assert sampling.token_temperatures(5, 0.7) == [0.7] * 5
    assert sampling.token_temperatures(5, (1.5, 0.5)) == pytest.approx([1.5, 1.25, 1.0, 0.75, 0.5])
    assert sampling.token_temperatures(1, (1.5, 0.5)) == [1.5]
    with pytest.raises(ValueError, match="pair"):
        sampling.token_temperatures(5, (1.0, 0.5, 0.2))
