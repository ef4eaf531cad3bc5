"""`sampling` against diffusers' AmusedScheduler: the same counts, temperatures, noise and tokens for the same
generator. Pure tensor tests (no model): token ids must be exactly equal, and the generators must end in the same
state (so both consumed the same random numbers, in the same order)."""

from __future__ import annotations

import math

import pytest
import torch

import sampling
from sampling import MaskingSchedule

MASK_ID = 71  # the tiny configs' mask id (vocab 72, codebook 64)
K = 64


def reference_scheduler(schedule="cosine", num_steps=12, temperature=(2, 0)):
    from diffusers import AmusedScheduler

    s = AmusedScheduler(mask_token_id=MASK_ID, masking_schedule=schedule)
    s.set_timesteps(num_steps, temperature)
    return s


def same_state(g1: torch.Generator, g2: torch.Generator) -> bool:
    return torch.equal(g1.get_state(), g2.get_state())


def reference_counts(schedule: str, seq_len: int, num_steps: int = 12) -> list[int]:
    """Masked tokens left after each step when the reference scheduler decodes from an all-masked sequence."""
    s = reference_scheduler(schedule, num_steps)
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((1, seq_len), MASK_ID)
    counts = []
    for t in s.timesteps:
        logits = torch.randn(1, K, seq_len, generator=g).permute(0, 2, 1)  # (B, L, K), with (B, L) ids
        tokens = s.step(logits, t, tokens, generator=g).prev_sample
        counts.append(int((tokens == MASK_ID).sum()))
    return counts


def our_counts(schedule: str, seq_len: int, num_steps: int = 12) -> list[int]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((1, seq_len), MASK_ID)
    temps = sampling.remask_temperatures(num_steps)
    counts = []
    for i in range(num_steps):
        logits = torch.randn(1, K, seq_len, generator=g).permute(0, 2, 1)
        tokens, _ = sampling.decode_step(
            logits,
            tokens,
            i,
            num_steps,
            mask_token_id=MASK_ID,
            schedule=schedule,
            remask_temperature=temps[i],
            generator=g,
        )
        counts.append(int((tokens == MASK_ID).sum()))
    return counts


# --- schedules and counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [256, 1024])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_mask_counts_match_reference(schedule, seq_len):
    assert our_counts(schedule, seq_len) == reference_counts(schedule, seq_len)


def test_cosine_counts_for_256_tokens_match_the_documented_list():
    # read off the reference (fp32: 127, not 128, after step 8)
    documented = [253, 247, 236, 221, 203, 181, 155, 127, 97, 66, 33, 0]
    assert our_counts("cosine", 256) == documented


def test_fp32_count_at_two_thirds():
    # cos(8/12 * pi/2) in fp32 floors to 127 of 256 and 511 of 1024 (exactly 128 and 512 in exact arithmetic)
    r = sampling.mask_ratio("cosine", 7, 12)
    assert r.dtype == torch.float32
    assert int(sampling.tokens_to_mask(r, 256, torch.tensor([256]))) == 127
    assert int(sampling.tokens_to_mask(r, 1024, torch.tensor([1024]))) == 511


def test_tokens_to_mask_bounds():
    r = torch.tensor(0.9)
    # never more than (masked now - 1), never fewer than 1
    assert sampling.tokens_to_mask(r, 100, torch.tensor([10, 100, 0])).flatten().tolist() == [9, 90, 1]
    # per-sample bases: a fraction of each sample's count
    assert sampling.tokens_to_mask(r, torch.tensor([[10], [50]]), torch.tensor([10, 50])).flatten().tolist() == [9, 45]


@pytest.mark.parametrize("spec", ["cosine", "linear", "arccos", "power", "power:3", "power:0.5"])
def test_schedules_go_from_all_to_none_monotonically(spec):
    s = MaskingSchedule.parse(spec)
    r = torch.linspace(0, 1, 101)
    m = s(r)
    assert m[0].item() == pytest.approx(1.0, abs=1e-6) and m[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert bool((m[1:] <= m[:-1] + 1e-7).all())


def test_schedule_formulas():
    r = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(MaskingSchedule.parse("power:2")(r), 1 - r**2)
    torch.testing.assert_close(MaskingSchedule.parse("arccos")(r), torch.arccos(r) * 2 / math.pi)
    torch.testing.assert_close(MaskingSchedule.parse("linear")(r), 1 - r)


@pytest.mark.parametrize("bad", ["cosin", "linear:2", "power:x", "power:-1"])
def test_bad_schedule_names_are_refused(bad):
    with pytest.raises(ValueError):
        MaskingSchedule.parse(bad)


@pytest.mark.parametrize("temperature", [(2, 0), (5, 1), 3.0])
def test_remask_temperatures_match_reference(temperature):
    assert torch.equal(
        sampling.remask_temperatures(12, temperature), reference_scheduler(temperature=temperature).temperatures
    )


# --- the decoding step --------------------------------------------------------------------------------------------


def random_case(batch=3, seq_len=64, masked_fraction=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, K, generator=g) * 3
    tokens = torch.randint(0, K, (batch, seq_len), generator=g)
    tokens[torch.rand(batch, seq_len, generator=g) < masked_fraction] = MASK_ID
    return logits, tokens


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("step", [0, 5, 11])
@pytest.mark.parametrize("starting_mask_ratio", [1.0, torch.tensor(0.4)])
def test_decode_step_matches_reference_step(schedule, step, starting_mask_ratio):
    logits, tokens = random_case()
    ref = reference_scheduler(schedule)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    theirs = ref.step(logits, ref.timesteps[step], tokens, starting_mask_ratio=starting_mask_ratio, generator=g1)
    ours, predicted = sampling.decode_step(
        logits,
        tokens,
        step,
        12,
        mask_token_id=MASK_ID,
        schedule=schedule,
        remask_temperature=sampling.remask_temperatures(12)[step],
        generator=g2,
        starting_mask_ratio=starting_mask_ratio,
    )
    assert torch.equal(ours, theirs.prev_sample)
    assert torch.equal(predicted, theirs.pred_original_sample)
    assert same_state(g1, g2)


def test_decode_step_keeps_known_tokens():
    logits, tokens = random_case()
    known = tokens != MASK_ID
    out, _ = sampling.decode_step(
        logits, tokens, 3, 12, mask_token_id=MASK_ID, remask_temperature=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[known], tokens[known])


def test_last_step_unmasks_everything():
    logits, tokens = random_case()
    out, predicted = sampling.decode_step(
        logits, tokens, 11, 12, mask_token_id=MASK_ID, generator=torch.Generator().manual_seed(0)
    )
    assert not (out == MASK_ID).any() and torch.equal(out, predicted)


def test_random_mask_matches_reference_add_noise():
    ref = reference_scheduler()
    tokens = torch.randint(0, K, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    theirs = ref.add_noise(tokens, ref.timesteps[5], generator=g1)
    ours = sampling.random_mask(tokens, sampling.mask_ratio("cosine", 5, 12), MASK_ID, g2)
    assert torch.equal(ours, theirs) and same_state(g1, g2)
    assert 0 < int((ours == MASK_ID).sum()) < ours.numel()


def test_random_mask_before_the_first_step_masks_everything():
    tokens = torch.randint(0, K, (2, 8, 8))
    ratio = sampling.mask_ratio("cosine", -1, 12)  # the ratio before step 0
    assert bool((sampling.random_mask(tokens, ratio, MASK_ID, torch.Generator().manual_seed(0)) == MASK_ID).all())


# --- per-sample generators ------------------------------------------------------------------------------------------


def test_a_list_of_generators_gives_each_sample_its_own_stream():
    logits, tokens = random_case(batch=3)
    temps = sampling.remask_temperatures(12)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch, _ = sampling.decode_step(
        logits, tokens, 2, 12, mask_token_id=MASK_ID, remask_temperature=temps[2], generator=gens
    )
    for b, seed in enumerate((10, 11, 12)):
        single, _ = sampling.decode_step(
            logits[b : b + 1],
            tokens[b : b + 1],
            2,
            12,
            mask_token_id=MASK_ID,
            remask_temperature=temps[2],
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(batch[b : b + 1], single)


def test_random_mask_with_a_list_of_generators():
    tokens = torch.randint(0, K, (2, 8, 8))
    ratio = torch.tensor(0.5)
    both = sampling.random_mask(
        tokens, ratio, MASK_ID, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    )
    for b, seed in enumerate((1, 2)):
        assert torch.equal(
            both[b : b + 1],
            sampling.random_mask(tokens[b : b + 1], ratio, MASK_ID, torch.Generator().manual_seed(seed)),
        )


def test_wrong_number_of_generators_is_refused():
    logits, tokens = random_case(batch=3)
    with pytest.raises(ValueError, match="generators"):
        sampling.decode_step(logits, tokens, 0, 12, mask_token_id=MASK_ID, generator=[torch.Generator()] * 2)


# --- the separate knobs --------------------------------------------------------------------------------------------


def test_sampling_temperature_divides_the_logits():
    logits = torch.randn(2, 5, K)
    torch.testing.assert_close(sampling.token_probabilities(logits, 0.5), (logits * 2).softmax(-1))
    assert torch.equal(sampling.token_probabilities(logits), logits.softmax(-1))


def test_low_sampling_temperature_draws_the_most_likely_code():
    logits, tokens = random_case()
    tokens[:] = MASK_ID
    _, predicted = sampling.decode_step(
        logits,
        tokens,
        11,
        12,
        mask_token_id=MASK_ID,
        sampling_temperature=1e-5,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(predicted, logits.argmax(-1))


def test_remask_temperature_zero_remasks_the_least_likely_tokens():
    logits, tokens = random_case(batch=1)
    tokens[:] = MASK_ID
    g = torch.Generator().manual_seed(0)
    out, predicted = sampling.decode_step(
        logits, tokens, 5, 12, mask_token_id=MASK_ID, remask_temperature=0.0, generator=g
    )
    p = logits.softmax(-1).gather(-1, predicted[..., None])[..., 0]
    remasked = out == MASK_ID
    assert remasked.any() and bool(p[remasked].max() <= p[~remasked].min())


def test_classifier_free_guidance():
    uncond, cond = torch.randn(2, 4, K), torch.randn(2, 4, K)
    both = torch.cat([uncond, cond])
    assert torch.equal(sampling.classifier_free_guidance(both, 1.0), uncond + (cond - uncond))
    torch.testing.assert_close(sampling.classifier_free_guidance(both, 10.0), uncond + 10 * (cond - uncond))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_guidance_schedules_ramp_up_to_the_scale(schedule):
    scales = sampling.guidance_scales(12, 10.0, schedule)
    assert scales[-1] == pytest.approx(10.0)
    assert all(b > a for a, b in zip(scales, scales[1:])) and scales[0] > 1.0
    assert sampling.guidance_scales(12, 10.0) == [10.0] * 12


def test_unknown_guidance_schedule_is_refused():
    with pytest.raises(ValueError, match="guidance schedule"):
        sampling.guidance_scales(12, 10.0, "exponential")
