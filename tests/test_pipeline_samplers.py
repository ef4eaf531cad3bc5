"""`muse.Pipeline` with the samplers and guidance options of `sampling`: text to image, image to image and
inpainting with every sampler (scheduled counts, known tokens, per-image generators), the guidance interval (U-ViT
rows counted with a spy on the transformer's forward_prepared), and the validation of the new options. Tiny
random-weight models on the CPU; the reference parity of the default sampler is in test_pipeline.py and
test_img2img_inpaint.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sampling
from muse import Pipeline
from muse.pipeline import _rows
from tests.test_img2img_inpaint import picture, rect_mask

STEPS = 5
SAMPLERS = {
    "confidence": "confidence",
    "halton": "halton",
    "halton-offset": sampling.HaltonSampler(random_offset=True),
    "random": "random",
    "remask": sampling.RemaskSampler(eta=0.5),
    "remask-rescale-random": sampling.RemaskSampler(eta=1.0, strategy="rescale", choose="random", steps=(1, 4)),
}
COMMON = dict(num_inference_steps=STEPS, output_type="latent", progress_bar=False)


@pytest.fixture(scope="module")
def pipe(published_dirs):
    return Pipeline.from_pretrained(str(published_dirs("tiny-256")))


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Steps:
    """A callback recording the tokens after every step."""

    def __init__(self):
        self.tokens = []

    def __call__(self, step, timestep, tokens):
        self.tokens.append(tokens.clone())


class Rows:
    """Wraps the U-ViT's forward_prepared (the decoding loop's call) to record the inputs of every call: the number
    of rows, the rows of the conditioning, and the tokens of the first call."""

    def __init__(self, transformer):
        self.transformer, self.rows, self.cond_rows, self.first = transformer, [], [], None
        self._forward = transformer.forward_prepared

    def __enter__(self):
        def spy(ids, cond):
            self.rows.append(ids.shape[0])
            self.cond_rows.append(cond.batch_size)
            if self.first is None:
                self.first = ids.clone()
            return self._forward(ids, cond)

        self.transformer.forward_prepared = spy
        return self

    def __exit__(self, *exc):
        del self.transformer.forward_prepared


def masked_counts(history, mask_id):
    return [(t == mask_id).sum(dim=(1, 2)).tolist() for t in history]


# --- every sampler, every call -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_text_to_image_with_every_sampler_keeps_the_schedule(pipe, name):
    seen, reference = Steps(), Steps()
    out = pipe(["a cat", "a dog"], sampler=SAMPLERS[name], generator=gen(0), callback=seen, **COMMON)
    pipe(["a cat", "a dog"], generator=gen(0), callback=reference, **COMMON)  # the reference sampler's counts
    assert masked_counts(seen.tokens, pipe.mask_token_id) == masked_counts(reference.tokens, pipe.mask_token_id)
    assert not (out == pipe.mask_token_id).any() and torch.equal(out, seen.tokens[-1])
    assert int(out.max()) < pipe.transformer.config.codebook_size


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_inpainting_never_changes_tokens_outside_the_mask(pipe, name):
    image = picture(2)
    tokens = pipe.vqvae.encode(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None])[0]
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 1:5] = False  # the mask's tokens (4 px per token)
    seen = Steps()
    out = pipe.inpaint(
        "a ball",
        image,
        rect_mask(8, 4, 24, 20),
        sampler=SAMPLERS[name],
        generator=gen(0),
        callback=seen,
        num_images_per_prompt=2,
        **COMMON,
    )
    for step in seen.tokens:  # after every step, not only at the end
        assert all(torch.equal(t[outside], tokens[outside]) for t in step)
    assert not (out == pipe.mask_token_id).any() and not torch.equal(out[0][~outside], tokens[~outside])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_never_changes_the_tokens_it_did_not_mask(pipe, name):
    seen = Steps()
    with Rows(pipe.transformer) as spy:
        out = pipe.img2img(
            "a cat", picture(1), strength=0.6, sampler=SAMPLERS[name], generator=gen(1), callback=seen, **COMMON
        )
    start = spy.first[1:]  # the conditional row (rows are [unconditional; conditional])
    known = start != pipe.mask_token_id
    assert known.any() and (~known).any()
    for step in seen.tokens:
        assert torch.equal(step[known], start[known])
    assert not (out == pipe.mask_token_id).any()


@pytest.mark.parametrize("name", ["halton-offset", "random", "remask"])
def test_a_list_of_generators_gives_each_image_its_own(pipe, name):
    seeds = [11, 12, 13]
    sampler = SAMPLERS[name]
    batch = pipe("a cat", num_images_per_prompt=3, sampler=sampler, generator=[gen(s) for s in seeds], **COMMON)
    for i, s in enumerate(seeds):
        assert torch.equal(batch[i : i + 1], pipe("a cat", sampler=sampler, generator=gen(s), **COMMON))
    assert not torch.equal(batch[0], batch[1])


def test_inpainting_with_a_list_of_generators_and_remask(pipe):
    args = ("a ball", picture(2), rect_mask(8, 4, 24, 20))
    sampler = SAMPLERS["remask"]
    batch = pipe.inpaint(*args, num_images_per_prompt=2, sampler=sampler, generator=[gen(3), gen(4)], **COMMON)
    for i, s in enumerate((3, 4)):
        assert torch.equal(batch[i : i + 1], pipe.inpaint(*args, sampler=sampler, generator=gen(s), **COMMON))


def test_the_confidence_sampler_is_the_default(pipe):
    a = pipe("a cat", generator=gen(5), **COMMON)
    assert torch.equal(a, pipe("a cat", sampler="confidence", generator=gen(5), **COMMON))
    assert torch.equal(a, pipe("a cat", sampler=sampling.ConfidenceSampler(), generator=gen(5), **COMMON))


# --- the guidance interval -----------------------------------------------------------------------------------------


def test_guidance_interval_runs_only_the_conditional_rows_outside_it(pipe):
    B, (start, end) = 2, (1, 3)
    with Rows(pipe.transformer) as spy:
        pipe(["a cat", "a dog"], guidance_interval=(start, end), generator=gen(0), **COMMON)
    assert spy.rows == [B, 2 * B, 2 * B, B, B] and spy.cond_rows == spy.rows
    assert 2 * B * STEPS - sum(spy.rows) == B * (STEPS - (end - start))  # the rows the docstring says are saved
    with Rows(pipe.transformer) as spy:
        pipe(["a cat", "a dog"], generator=gen(0), **COMMON)
    assert spy.rows == [2 * B] * STEPS


def test_guidance_interval_in_img2img_counts_the_steps_of_the_whole_schedule(pipe):
    # strength 0.6 of 5 steps runs steps 2, 3, 4; the interval (0, 3) guides step 2 only
    with Rows(pipe.transformer) as spy:
        pipe.img2img("a cat", picture(1), strength=0.6, guidance_interval=(0, 3), generator=gen(0), **COMMON)
    assert spy.rows == [2, 1, 1]


def test_guidance_interval_over_every_step_is_the_reference_path(pipe):
    a = pipe(["a cat", "a dog"], generator=gen(2), **COMMON)
    assert torch.equal(a, pipe(["a cat", "a dog"], guidance_interval=(0, STEPS), generator=gen(2), **COMMON))
    assert not torch.equal(a, pipe(["a cat", "a dog"], guidance_interval=(0, 2), generator=gen(2), **COMMON))


def test_the_conditional_rows_of_the_prepared_conditioning_are_the_conditional_prepared_rows(pipe):
    # what the loop runs outside the interval: the last B rows of the 2B-row conditioning, not re-prepared, give
    # the logits of a conditioning prepared from the conditional rows alone
    uvit = pipe.transformer
    cfg = uvit.config
    g = gen(0)
    B = 2
    text = torch.randn(2 * B, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(2 * B, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([[32.0, 32.0, 0.0, 0.0, 6.0]]).expand(2 * B, -1)
    ids = torch.randint(0, cfg.codebook_size, (B, 8, 8), generator=g)
    sliced = _rows(uvit.prepare(text, pooled, micro), slice(B, None))
    assert sliced.batch_size == B
    alone = uvit.prepare(text[B:], pooled[B:], micro[B:])
    with torch.no_grad():
        torch.testing.assert_close(
            uvit.forward_prepared(ids, sliced), uvit.forward_prepared(ids, alone), rtol=1e-5, atol=1e-5
        )


# --- the other options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knob",
    [
        dict(sampler="halton"),
        dict(sampler="random"),
        dict(sampler="remask"),
        dict(guidance_schedule="power-cosine"),
        dict(sampling_temperature=(1.5, 0.5)),
    ],
)
def test_knobs_change_the_result(pipe, knob):
    assert not torch.equal(pipe("a cat", generator=gen(0), **knob, **COMMON), pipe("a cat", generator=gen(0), **COMMON))


def test_a_constant_temperature_pair_is_that_temperature(pipe):
    a = pipe("a cat", sampling_temperature=(0.5, 0.5), generator=gen(0), **COMMON)
    assert torch.equal(a, pipe("a cat", sampling_temperature=0.5, generator=gen(0), **COMMON))


BAD = {
    "unknown sampler": (
        dict(sampler="maskgit"),
        "unknown sampler 'maskgit'; choose one of confidence, halton, random, remask",
    ),
    "sampler of the wrong type": (dict(sampler=3), "sampler"),
    "interval past the steps": (dict(guidance_interval=(1, STEPS + 1)), r"inside \[0, 5\]"),
    "interval reversed": (dict(guidance_interval=(3, 1)), "start <= end"),
    "interval of floats": (dict(guidance_interval=(0.0, 2.0)), "integers"),
    "interval not a pair": (dict(guidance_interval=2), "pair"),
    "infinite temperature": (dict(sampling_temperature=float("inf")), "finite"),
    "zero temperature at the end": (dict(sampling_temperature=(1.0, 0.0)), "> 0"),
    "temperature triple": (dict(sampling_temperature=(1.0, 0.5, 0.2)), "pair"),
    "bad power-cosine exponent": (dict(guidance_schedule="power-cosine:-1"), "exponent"),
    "unknown guidance schedule": (dict(guidance_schedule="exponential"), "guidance_schedule"),
    "remask steps past the call": (dict(sampler=sampling.RemaskSampler(steps=(0, 9))), "remask steps"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_are_refused_clearly(pipe, case):
    args, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **args, **COMMON)
