"""Refinement passes after decoding (`sampling.refine`, the pipeline's `refine_steps` / `refine_ratio`): the pure
functions, one pass computed by hand from the U-ViT's guided logits against the pipeline's, the tokens a call may
not change (image to image, inpainting), per-image generators, the U-ViT rows of the passes, and the validation.
Tiny random-weight models on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sampling
from muse import Pipeline
from tests.test_img2img_inpaint import picture, rect_mask
from tests.test_pipeline_samplers import Rows, gen

STEPS = 4
COMMON = dict(num_inference_steps=STEPS, output_type="latent", progress_bar=False)


@pytest.fixture(scope="module")
def pipe(published_dirs):
    return Pipeline.from_pretrained(str(published_dirs("tiny-256")))


# --- the pure functions --------------------------------------------------------------------------------------------


def test_ratios_are_constant_or_annealed_linearly():
    assert sampling.refine_ratios(3, 0.3) == [0.3, 0.3, 0.3]
    assert sampling.refine_ratios(5, (0.6, 0.2)) == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2])
    assert sampling.refine_ratios(1, (0.6, 0.2)) == [0.6]
    assert sampling.refine_ratios(0, 0.3) == []


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan, True, (0.5, 0.0), (0.1, 0.2, 0.3)])
def test_ratios_outside_zero_to_one_are_refused(ratio):
    with pytest.raises(ValueError, match="refinement ratio"):
        sampling.refine_ratios(2, ratio)


@pytest.mark.parametrize("passes", [-1, 1.5, True])
def test_the_number_of_passes_is_a_non_negative_integer(passes):
    with pytest.raises(ValueError, match="refinement passes"):
        sampling.refine_ratios(passes, 0.3)


def test_the_mask_covers_only_editable_positions_at_about_the_ratio():
    editable = torch.zeros(4, 4096, dtype=torch.bool)
    editable[:, :2048] = True
    masked = sampling.refine_mask(editable, 0.25, gen(0))
    assert not masked[~editable].any()
    assert abs(float(masked[editable].float().mean()) - 0.25) < 0.02  # 8192 Bernoulli draws: sd 0.005
    assert sampling.refine_mask(editable, 1.0, gen(0)).equal(editable)


def test_the_mask_of_a_list_of_generators_is_each_rows_own():
    editable = torch.ones(3, 64, dtype=torch.bool)
    batch = sampling.refine_mask(editable, 0.5, [gen(1), gen(2), gen(3)])
    for b, seed in enumerate((1, 2, 3)):
        assert batch[b : b + 1].equal(sampling.refine_mask(editable[:1], 0.5, gen(seed)))


def test_a_step_puts_the_most_likely_code_at_masked_positions_only():
    logits = torch.randn(2, 6, 10, generator=gen(0))
    tokens = torch.randint(0, 10, (2, 6), generator=gen(1))
    masked = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    out = sampling.refine_step(logits, tokens, masked)
    assert out[masked].equal(logits.argmax(-1)[masked]) and out[~masked].equal(tokens[~masked])


# --- in the pipeline -----------------------------------------------------------------------------------------------


def _guided_logits(pipe, prompts, tokens, scale):
    """The U-ViT's guided logits (B, L, K) for `tokens` (B, h, w), computed here from its plain forward."""
    B = len(prompts)
    pooled, hidden = pipe.encode_prompt(list(prompts) + [""] * B)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    micro = torch.tensor([[size, size, 0, 0, 6.0]]).expand(2 * B, -1)
    rows = torch.cat([tokens, tokens])
    with torch.no_grad():
        logits = pipe.transformer(rows, hidden, pooled, micro)  # (2B, K, h, w): [conditional; unconditional]
    cond, uncond = logits.permute(0, 2, 3, 1).flatten(1, 2).chunk(2)  # (B, L, K) each
    return uncond + scale * (cond - uncond)


GUIDANCE = {
    "constant, every step": (dict(), 10.0),
    # every guidance schedule reaches the full scale at the last step; the interval ends with it
    "linear schedule, interval (2, 4)": (dict(guidance_schedule="linear", guidance_interval=(2, STEPS)), 10.0),
    "interval (0, 2): the last step unguided": (dict(guidance_interval=(0, 2)), None),
    "no guidance": (dict(guidance_scale=1.0), None),
}


@pytest.mark.parametrize("case", list(GUIDANCE))
def test_one_pass_is_the_argmax_of_the_logits_of_the_last_steps_guidance(pipe, case):
    options, scale = GUIDANCE[case]
    prompts = ["a cat", "a dog"]
    g = gen(3)
    decoded = pipe(prompts, generator=g, **options, **COMMON)  # (2, h, w); g has advanced past the decoding's draws
    flat = decoded.flatten(1)
    masked = sampling.refine_mask(torch.ones_like(flat, dtype=torch.bool), 0.5, g)  # the pass's draw, next on g
    x = torch.where(masked, pipe.mask_token_id, flat).view_as(decoded)
    logits = _guided_logits(pipe, prompts, x, 1.0 if scale is None else scale)  # scale 1: the conditional logits
    expected = torch.where(masked, logits.argmax(-1), flat).view_as(decoded)
    refined = pipe(prompts, generator=gen(3), refine_steps=1, refine_ratio=0.5, **options, **COMMON)
    assert masked.any() and (~masked).any()
    assert torch.equal(refined, expected)
    assert not torch.equal(refined, decoded)


def test_inpainting_passes_never_change_the_tokens_outside_the_mask(pipe):
    image = picture(2)
    tokens = pipe.vqvae.encode(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None])[0]
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 1:5] = False  # the mask's tokens (4 px per token)
    args = ("a ball", image, rect_mask(8, 4, 24, 20))
    plain = pipe.inpaint(*args, generator=gen(0), **COMMON)
    out = pipe.inpaint(*args, generator=gen(0), refine_steps=3, refine_ratio=1.0, **COMMON)
    assert torch.equal(out[0][outside], tokens[outside])
    assert not torch.equal(out, plain)  # the passes changed something inside


def test_img2img_passes_never_change_the_tokens_it_did_not_mask(pipe):
    with Rows(pipe.transformer) as spy:
        out = pipe.img2img(
            "a cat", picture(1), strength=0.6, generator=gen(1), refine_steps=2, refine_ratio=1.0, **COMMON
        )
    start = spy.first[1:]  # the conditional row of the first call
    known = start != pipe.mask_token_id
    assert known.any() and (~known).any()
    assert torch.equal(out[known], start[known])


def test_a_list_of_generators_refines_each_image_on_its_own(pipe):
    opts = dict(refine_steps=2, refine_ratio=(0.7, 0.3), **COMMON)
    batch = pipe("a cat", num_images_per_prompt=2, generator=[gen(11), gen(12)], **opts)
    for i, s in enumerate((11, 12)):
        assert torch.equal(batch[i : i + 1], pipe("a cat", generator=gen(s), **opts))


def test_the_passes_run_as_the_last_step_is_guided(pipe):
    B = 2
    with Rows(pipe.transformer) as spy:
        pipe(["a cat", "a dog"], generator=gen(0), refine_steps=3, **COMMON)
    assert spy.rows == [2 * B] * (STEPS + 3)
    with Rows(pipe.transformer) as spy:  # the last step unguided: so are the passes, on the conditional rows
        pipe(["a cat", "a dog"], generator=gen(0), refine_steps=3, guidance_interval=(0, 2), **COMMON)
    assert spy.rows == [2 * B] * 2 + [B] * (STEPS - 2 + 3) and spy.cond_rows == spy.rows
    with Rows(pipe.transformer) as spy:
        pipe(["a cat", "a dog"], generator=gen(0), refine_steps=2, guidance_scale=1.0, **COMMON)
    assert spy.rows == [B] * (STEPS + 2)


def test_non_finite_logits_in_a_pass_are_caught(pipe, monkeypatch):
    from muse.pipeline import NonFiniteLogitsError

    calls, real = [], pipe.transformer.forward_prepared

    def poisoned(ids, cond):
        calls.append(1)
        logits = real(ids, cond)
        return logits.fill_(float("nan")) if len(calls) > STEPS else logits

    monkeypatch.setattr(pipe.transformer, "forward_prepared", poisoned)
    with pytest.raises(NonFiniteLogitsError, match="first at refinement pass 1 of 2"):
        pipe("a cat", generator=gen(0), refine_steps=2, **COMMON)


BAD = {
    "negative passes": (dict(refine_steps=-1), "refine_steps must be an integer >= 0"),
    "fractional passes": (dict(refine_steps=1.5), "refine_steps must be an integer >= 0"),
    "boolean passes": (dict(refine_steps=True), "refine_steps must be an integer >= 0"),
    "zero ratio": (dict(refine_steps=1, refine_ratio=0.0), r"refine_ratio must lie in \(0, 1\]"),
    "ratio above one": (dict(refine_steps=1, refine_ratio=(0.5, 1.5)), r"refine_ratio must lie in \(0, 1\]"),
    "NaN ratio": (dict(refine_steps=1, refine_ratio=math.nan), "refine_ratio must be finite"),
    "ratio triple": (dict(refine_steps=1, refine_ratio=(0.5, 0.4, 0.3)), "pair"),
    "ratio text": (dict(refine_steps=1, refine_ratio="0.5"), "refine_ratio must be a number"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_refinement_options_are_refused_clearly(pipe, case):
    args, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **args, **COMMON)
