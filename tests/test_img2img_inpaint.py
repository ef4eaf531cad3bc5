"""Image to image and inpainting: `muse.Pipeline.img2img / inpaint` loaded from a published folder against
diffusers' AmusedImg2ImgPipeline / AmusedInpaintPipeline on the same weights (random), CPU fp32, same generator.

Tolerances as for text to image: token ids exactly equal, images within 1e-5 (fp32 decode of the same ids).
The reference pipelines are built from the session's reference components with their OWN schedulers: building
AmusedInpaintPipeline switches its scheduler to the linear schedule for good (one of the defects we fix), and must
not leak into other tests.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from muse import Pipeline
from tests.helpers import assert_same_outputs, run_ours, run_reference

PIXEL_TOL = 1e-5
FEW_STEPS = 4
SIZE = 32  # tiny VQ-GAN: 4 px per token, an 8x8 grid


@pytest.fixture(scope="module")
def ours(published_dirs):
    cache = {}

    def get(kind: str) -> Pipeline:
        if kind not in cache:
            cache[kind] = Pipeline.from_pretrained(str(published_dirs(kind)))
        return cache[kind]

    return get


def _reference(reference_pipelines, kind: str, cls_name: str):
    import diffusers

    base = reference_pipelines(kind)
    pipe = getattr(diffusers, cls_name)(
        vqvae=base.vqvae,
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        transformer=base.transformer,
        scheduler=diffusers.AmusedScheduler(mask_token_id=base.scheduler.config.mask_token_id),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_img2img(reference_pipelines):
    return lambda kind: _reference(reference_pipelines, kind, "AmusedImg2ImgPipeline")


@pytest.fixture(scope="module")
def ref_inpaint(reference_pipelines):
    return lambda kind: _reference(reference_pipelines, kind, "AmusedInpaintPipeline")


def picture(seed=0, size=SIZE) -> PIL.Image.Image:
    """A smooth RGB test picture (gradients and a disc), so that VQ tokens vary but are not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    c = rng.uniform(0.2, 0.8, 3)
    disc = ((x - c[0]) ** 2 + (y - c[1]) ** 2 < 0.08).astype(float)
    rgb = np.stack([x, y * c[2], disc], -1)
    return PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))


def rect_mask(top, left, bottom, right, size=SIZE, mode="L") -> PIL.Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[top:bottom, left:right] = 255
    return PIL.Image.fromarray(m).convert(mode)


def blob_mask(seed=0, size=SIZE) -> PIL.Image.Image:
    """An irregular mask with soft (grey) edges, so the resize and the 0.5 threshold matter."""
    y, x = np.mgrid[0:size, 0:size] / size
    v = np.sin(7 * x + seed) * np.cos(5 * y) + 0.3 * np.sin(13 * x * y)
    return PIL.Image.fromarray((np.clip(v + 0.5, 0, 1) * 255).astype(np.uint8))


def assert_same(ours_out, theirs_out):
    assert_same_outputs(ours_out, theirs_out, PIXEL_TOL)


class FirstInput:
    """Wraps a U-ViT's forward_prepared (what the decoding loop calls) to record the token grid of its first call."""

    def __init__(self, transformer):
        self.transformer, self.tokens = transformer, None
        self._forward = transformer.forward_prepared

    def __enter__(self):
        def spy(ids, *args):
            if self.tokens is None:
                self.tokens = ids.clone()
            return self._forward(ids, *args)

        self.transformer.forward_prepared = spy
        return self

    def __exit__(self, *exc):
        del self.transformer.forward_prepared  # back to the class method


# --- image to image ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.9])
def test_img2img_matches_reference(strength, ours, ref_img2img):
    args = dict(prompt="a watercolour", image=picture(1), strength=strength)
    theirs = run_reference(ref_img2img("tiny-256"), 0, **args)
    assert_same(run_ours(ours("tiny-256").img2img, 0, **args), theirs)


@pytest.mark.slow
def test_img2img_512_layout_batch_matches_reference(ours, ref_img2img):
    args = dict(
        prompt=["a cat", "a dog"],
        image=[picture(1), picture(2)],
        strength=0.6,
        negative_prompt=["x", "y"],
        num_images_per_prompt=2,
        guidance_scale=3.0,
    )
    theirs = run_reference(ref_img2img("tiny-512"), 3, **args)
    assert_same(run_ours(ours("tiny-512").img2img, 3, **args), theirs)


@pytest.mark.slow
def test_img2img_at_full_strength_masks_every_token(ours, ref_img2img):
    pipe = ours("tiny-256")
    with FirstInput(pipe.transformer) as spy:
        pipe.img2img(
            "a cat",
            picture(1),
            strength=1.0,
            num_inference_steps=FEW_STEPS,
            output_type="latent",
            progress_bar=False,
            generator=torch.Generator().manual_seed(0),
        )
    assert bool((spy.tokens == pipe.mask_token_id).all())


def test_reference_img2img_at_full_strength_masks_nothing(ref_img2img, ours):
    # the defect we fix: the reference's first model input at strength 1 is the image's tokens, unmasked
    ref = ref_img2img("tiny-256")
    seen = {}
    forward = ref.transformer.forward

    def spy(input_ids, *args, **kwargs):
        seen.setdefault("ids", input_ids.clone())
        return forward(input_ids, *args, **kwargs)

    ref.transformer.forward = spy
    try:
        ref(
            "a cat",
            image=picture(1),
            strength=1.0,
            num_inference_steps=FEW_STEPS,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        del ref.transformer.forward
    assert not (seen["ids"] == ours("tiny-256").mask_token_id).any()


def test_img2img_list_of_generators(ours):
    pipe = ours("tiny-256")
    common = dict(strength=0.7, num_inference_steps=FEW_STEPS, output_type="latent", progress_bar=False)
    seeds = [3, 4]
    batch = pipe.img2img(
        "a cat",
        picture(1),
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        **common,
    )
    for i, s in enumerate(seeds):
        single = pipe.img2img("a cat", picture(1), generator=torch.Generator().manual_seed(s), **common)
        assert torch.equal(batch[i : i + 1], single)
    assert not torch.equal(batch[0], batch[1])


def test_one_image_serves_every_prompt(ours):
    pipe = ours("tiny-256")
    common = dict(strength=0.5, num_inference_steps=FEW_STEPS, output_type="latent", progress_bar=False)
    one = pipe.img2img(["a", "b"], picture(1), generator=torch.Generator().manual_seed(0), **common)
    two = pipe.img2img(["a", "b"], [picture(1), picture(1)], generator=torch.Generator().manual_seed(0), **common)
    assert torch.equal(one, two)


# --- inpainting --------------------------------------------------------------------------------------------------


MASKS = {
    "rectangle": lambda: rect_mask(8, 4, 24, 20),
    "rgb-mode-corner": lambda: rect_mask(0, 16, 12, 32, mode="RGB"),
    "soft-blob": lambda: blob_mask(1),
    "tensor": lambda: torch.from_numpy(np.asarray(blob_mask(2), dtype=np.float32) / 255),
}


@pytest.mark.parametrize("mask", list(MASKS))
def test_inpaint_matches_reference(mask, ours, ref_inpaint):
    args = dict(prompt="a red ball", image=picture(2), mask_image=MASKS[mask]())
    theirs = run_reference(ref_inpaint("tiny-256"), 1, **args)
    assert_same(run_ours(ours("tiny-256").inpaint, 1, **args), theirs)


def test_inpaint_512_layout_partial_strength_matches_reference(ours, ref_inpaint):
    args = dict(
        prompt="a red ball", image=picture(3), mask_image=rect_mask(0, 0, 16, 32), strength=0.5, num_images_per_prompt=2
    )
    theirs = run_reference(ref_inpaint("tiny-512"), 2, **args)
    assert_same(run_ours(ours("tiny-512").inpaint, 2, **args), theirs)


def test_inpaint_keeps_tokens_outside_the_mask(ours):
    pipe = ours("tiny-256")
    image = picture(2)
    tokens = pipe.vqvae.encode(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None])
    out = pipe.inpaint(
        "a ball",
        image,
        rect_mask(8, 4, 24, 20),
        num_inference_steps=FEW_STEPS,
        output_type="latent",
        progress_bar=False,
        generator=torch.Generator().manual_seed(0),
    )
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 1:5] = False  # the mask's tokens (4 px per token)
    assert torch.equal(out[0][outside], tokens[0][outside]) and not torch.equal(out[0][~outside], tokens[0][~outside])


def test_inpaint_leaves_the_shared_schedule_alone(ours, reference_pipelines):
    pipe = ours("tiny-256")
    common = dict(prompt="a cat", num_inference_steps=FEW_STEPS)
    before = run_ours(pipe, 0, **common)
    pipe.inpaint(
        "a ball",
        picture(2),
        rect_mask(8, 4, 24, 20),
        num_inference_steps=FEW_STEPS,
        output_type="latent",
        progress_bar=False,
    )
    assert pipe.masking_schedule.name == "cosine"
    assert torch.equal(run_ours(pipe, 0, **common)[0], before[0])


def test_reference_inpaint_pipeline_switches_a_shared_scheduler(reference_pipelines):
    # the defect we fix, shown on a throwaway scheduler (never the session's)
    import diffusers

    base = reference_pipelines("tiny-256")
    scheduler = diffusers.AmusedScheduler(mask_token_id=base.scheduler.config.mask_token_id)
    diffusers.AmusedInpaintPipeline(
        vqvae=base.vqvae,
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        transformer=base.transformer,
        scheduler=scheduler,
    )
    assert scheduler.config.masking_schedule == "linear"


def test_paste_unmasked_puts_original_pixels_back_outside_the_mask(ours):
    pipe = ours("tiny-256")
    image, mask = picture(2), blob_mask(1)
    common = dict(num_inference_steps=FEW_STEPS, output_type="np", progress_bar=False)
    plain = pipe.inpaint("a ball", image, mask, generator=torch.Generator().manual_seed(0), **common)
    pasted = pipe.inpaint(
        "a ball", image, mask, paste_unmasked=True, generator=torch.Generator().manual_seed(0), **common
    )
    original = np.asarray(image, np.float32) / 255
    inside = np.asarray(mask) >= 128  # the mask binarised at 0.5
    assert inside.any() and (~inside).any()
    assert np.array_equal(pasted[0][~inside], original[~inside])
    assert np.array_equal(pasted[0][inside], plain[0][inside])
    assert not np.array_equal(plain[0][~inside], original[~inside])  # without it, outside pixels are VQ reconstructions


# --- bad input --------------------------------------------------------------------------------------------------


BAD = {
    "image RGBA": ("img2img", dict(image=picture(1).convert("RGBA")), "mode"),
    "image grayscale": ("img2img", dict(image=picture(1).convert("L")), "mode"),
    "image size off the token grid": ("img2img", dict(image=picture(1, size=30)), "multiple of 4"),
    "image integer array": ("img2img", dict(image=np.zeros((32, 32, 3), np.int32)), "float"),
    "image count": ("img2img", dict(prompt=["a", "b", "c"], image=[picture(1), picture(2)]), "images for 3 prompts"),
    "strength zero": ("img2img", dict(image=picture(1), strength=0.0), r"\(0, 1\]"),
    "strength above one": (
        "inpaint",
        dict(image=picture(1), mask_image=rect_mask(0, 0, 8, 8), strength=1.5),
        r"\(0, 1\]",
    ),
    "strength too small for the steps": ("img2img", dict(image=picture(1), strength=0.05), "runs no step"),
    "zero steps": ("img2img", dict(image=picture(1), num_inference_steps=0), "num_inference_steps"),
    "mask size": (
        "inpaint",
        dict(image=picture(1), mask_image=rect_mask(0, 0, 8, 8, size=16)),
        "differs from the image size",
    ),
    "mask mode": ("inpaint", dict(image=picture(1), mask_image=rect_mask(0, 0, 8, 8).convert("P")), "mask mode"),
    "empty mask": ("inpaint", dict(image=picture(1), mask_image=rect_mask(0, 0, 0, 0)), "nothing to repaint"),
    "paste with latent output": (
        "inpaint",
        dict(image=picture(1), mask_image=rect_mask(0, 0, 8, 8), paste_unmasked=True, output_type="latent"),
        "latent",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_clearly(case, ours):
    method, args, message = BAD[case]
    args = dict(args)
    prompt = args.pop("prompt", "a cat")
    with pytest.raises((ValueError, TypeError), match=message):
        getattr(ours("tiny-256"), method)(
            prompt, progress_bar=False, num_inference_steps=args.pop("num_inference_steps", 2), **args
        )
