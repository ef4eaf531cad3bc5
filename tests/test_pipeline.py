"""Text to image: `muse.Pipeline` loaded from a published folder against diffusers' AmusedPipeline on the same
folder's weights (random), CPU fp32, same prompts and generator seeds.

Tolerances: token ids exactly equal (the sampler must consume the generator as the reference does); images within
1e-5 absolute (fp32 VQ decode of the same ids; the networks' measured pixel difference is below 1e-6).
Each call's final tokens are read through `callback` at the last step, so one call per pipeline gives both tokens
and images.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from muse import Pipeline
from tests.helpers import assert_same_outputs, run_ours, run_reference

PIXEL_TOL = 1e-5
FEW_STEPS = 4  # for tests of our own behaviour, where the reference is not involved


@pytest.fixture(scope="module")
def ours(published_dirs):
    cache = {}

    def get(kind: str) -> Pipeline:
        if kind not in cache:
            cache[kind] = Pipeline.from_pretrained(str(published_dirs(kind)))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def reference(reference_pipelines):
    def get(kind: str):
        pipe = reference_pipelines(kind)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return get


# --- parity ------------------------------------------------------------------------------------------------------


CASES = {
    "defaults": dict(prompt="a photo of a cat"),
    "batch-negatives-copies": dict(
        prompt=["a red car", "an astronaut riding a horse"],
        negative_prompt=["blurry", "low quality"],
        num_images_per_prompt=2,
        guidance_scale=4.0,
    ),
    "no-guidance-scalar-temperature": dict(
        prompt=["a dog", ""],
        guidance_scale=1.0,
        temperature=3.0,
        num_inference_steps=8,
        micro_conditioning_aesthetic_score=5,
        micro_conditioning_crop_coord=(4, 8),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_text_to_image_matches_reference(kind, case, ours, reference):
    args = CASES[case]
    assert_same(run_ours(ours(kind), 0, **args), run_reference(reference(kind), 0, **args))


@pytest.mark.slow
def test_non_square_size_matches_reference(ours, reference):
    args = dict(prompt="a wide landscape", height=24, width=40, num_inference_steps=6)  # tiny VQ: 4 px per token
    assert_same(run_ours(ours("tiny-256"), 3, **args), run_reference(reference("tiny-256"), 3, **args))


@pytest.mark.full
def test_full_256_matches_reference(ours, reference):
    # the one full-size call of each pipeline (about 90 s each on a 2-core CPU)
    args = dict(prompt="a photo of a cat", negative_prompt="blurry")
    assert_same(run_ours(ours("full-256"), 0, **args), run_reference(reference("full-256"), 0, **args))


@pytest.mark.slow
def test_prompt_embeddings_with_negative_embeddings_match_reference(ours, reference):
    pipe, ref = ours("tiny-256"), reference("tiny-256")
    pe, ehs = pipe.encode_prompt(["a cat", "a dog"])
    npe, nehs = pipe.encode_prompt(["ugly", "dark"])
    emb = dict(
        prompt_embeds=pe, encoder_hidden_states=ehs, negative_prompt_embeds=npe, negative_encoder_hidden_states=nehs
    )
    assert_same(run_ours(pipe, 1, **emb), run_reference(ref, 1, **emb))


@pytest.mark.slow
def test_prompt_embeddings_without_negative_ones_use_the_empty_negative_prompt(ours):
    # the reference crashes here (it takes len(prompt) of None); we encode "" for each row, as for a text prompt
    pipe = ours("tiny-256")
    pe, ehs = pipe.encode_prompt(["a cat", "a dog"])
    from_embeddings = run_ours(pipe, 2, prompt_embeds=pe, encoder_hidden_states=ehs, num_inference_steps=FEW_STEPS)
    from_text = run_ours(pipe, 2, prompt=["a cat", "a dog"], num_inference_steps=FEW_STEPS)
    assert torch.equal(from_embeddings[0], from_text[0])


@pytest.mark.slow
def test_a_single_negative_prompt_applies_to_every_prompt(ours):
    pipe = ours("tiny-256")
    one = run_ours(pipe, 4, prompt=["a cat", "a dog"], negative_prompt="blurry", num_inference_steps=FEW_STEPS)
    each = run_ours(
        pipe, 4, prompt=["a cat", "a dog"], negative_prompt=["blurry", "blurry"], num_inference_steps=FEW_STEPS
    )
    assert torch.equal(one[0], each[0])


# --- seeds and generators ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_image_different_seed_different_image(ours):
    pipe = ours("tiny-256")
    a = run_ours(pipe, 5, prompt="a cat", num_inference_steps=FEW_STEPS)
    b = run_ours(pipe, 5, prompt="a cat", num_inference_steps=FEW_STEPS)
    c = run_ours(pipe, 6, prompt="a cat", num_inference_steps=FEW_STEPS)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and np.abs(a[1] - c[1]).max() > 0.1


def test_a_list_of_generators_gives_each_image_its_own(ours):
    pipe = ours("tiny-256")
    seeds = [11, 12, 13]
    common = dict(prompt="a cat", num_inference_steps=FEW_STEPS, output_type="latent", progress_bar=False)
    batch = pipe(num_images_per_prompt=3, generator=[torch.Generator().manual_seed(s) for s in seeds], **common)
    singles = [pipe(generator=torch.Generator().manual_seed(s), **common) for s in seeds]
    for i, single in enumerate(singles):
        assert torch.equal(batch[i : i + 1], single)
    assert not torch.equal(singles[0], singles[1])


# --- outputs and options ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_output_types(ours):
    pipe = ours("tiny-512")
    common = dict(prompt=["a", "b"], num_inference_steps=2, progress_bar=False)
    ids = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **common)
    arr = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **common)
    pil = pipe(generator=torch.Generator().manual_seed(0), **common)
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long and int(ids.max()) < pipe.transformer.config.codebook_size
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    assert len(pil) == 2 and all(
        isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil
    )
    assert np.array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))


@pytest.mark.slow
def test_callback_sees_every_step(ours):
    seen = []
    ours("tiny-256")(
        "a cat",
        num_inference_steps=5,
        output_type="latent",
        progress_bar=False,
        callback=lambda step, t, tokens: seen.append((step, t, int((tokens == 71).sum()))),
    )
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4] and [t for _, t, _ in seen] == [4, 3, 2, 1, 0]
    assert seen[-1][2] == 0 and all(a[2] > b[2] for a, b in zip(seen, seen[1:]))


@pytest.mark.slow
def test_mask_counts_relative_to_masked_tokens_equal_sequence_counts_from_scratch(ours):
    # from an all-masked grid the two bases coincide
    pipe = ours("tiny-256")
    common = dict(prompt="a cat", num_inference_steps=FEW_STEPS)
    assert torch.equal(run_ours(pipe, 0, mask_count_base="masked", **common)[0], run_ours(pipe, 0, **common)[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "knob", [dict(guidance_schedule="linear"), dict(masking_schedule="arccos"), dict(sampling_temperature=0.5)]
)
def test_knobs_change_the_result(ours, knob):
    pipe = ours("tiny-256")
    common = dict(prompt="a cat", num_inference_steps=FEW_STEPS)
    assert not torch.equal(run_ours(pipe, 0, **knob, **common)[0], run_ours(pipe, 0, **common)[0])


@pytest.mark.slow
def test_half_precision_runs(published_dirs):
    pipe = Pipeline.from_pretrained(str(published_dirs("tiny-256")), dtype=torch.bfloat16)
    out = pipe(
        "a cat",
        num_inference_steps=FEW_STEPS,
        output_type="np",
        progress_bar=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all() and out.std() > 0.05


# --- bad input --------------------------------------------------------------------------------------------------


BAD = {
    "empty prompt list": (dict(prompt=[]), "empty"),
    "mismatched negatives": (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative prompts"),
    "no prompt": (dict(), "exactly one of"),
    "prompt and embeddings": (
        dict(prompt="a", prompt_embeds=torch.zeros(1, 32), encoder_hidden_states=torch.zeros(1, 77, 32)),
        "exactly one of",
    ),
    "half the embeddings": (dict(prompt_embeds=torch.zeros(1, 32)), "both"),
    "mismatched embedding rows": (
        dict(
            prompt_embeds=torch.zeros(2, 32),
            encoder_hidden_states=torch.zeros(2, 77, 32),
            negative_prompt_embeds=torch.zeros(1, 32),
            negative_encoder_hidden_states=torch.zeros(1, 77, 32),
        ),
        "rows",
    ),
    "zero steps": (dict(prompt="a", num_inference_steps=0), "num_inference_steps"),
    "height off the grid": (dict(prompt="a", height=30), "multiple of 4"),
    "odd grid for a downsampling model": (dict(prompt="a", height=36, kind="tiny-512"), "multiples of 2"),
    "unknown output type": (dict(prompt="a", output_type="tensor"), "output_type"),
    "unknown option": (dict(prompt="a", num_steps=3), "unknown argument"),
    "wrong number of generators": (
        dict(prompt="a", num_images_per_prompt=2, generator=[torch.Generator()]),
        "generators",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_clearly(case, ours):
    args, message = BAD[case]
    args = dict(args)
    pipe = ours(args.pop("kind", "tiny-256"))
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(progress_bar=False, **args)


def assert_same(ours_out, theirs_out):
    assert_same_outputs(ours_out, theirs_out, PIXEL_TOL, varied=True)
