"""Code written for diffusers' AmusedPipeline runs unchanged on `muse.Pipeline`: `from_pretrained(folder,
torch_dtype=..., variant=...)`, `pipe(prompt, generator=g).images[0]`, `load_lora_weights`, `.to(...)`, on a folder
in the published layout (random weights), with the reference's tokens.

Tolerances: token ids exactly equal; the saved PNGs byte-for-byte equal in pixels (the same ids decoded by VQ-GANs
that agree within 1e-6, then rounded to 8 bits)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from convert.lora import inject_lora, save_lora
from muse import Pipeline

PROMPT = "a photo of a cat"


# the seed's usage, written for diffusers; ours swaps only the import line
SEED_USAGE = """
import torch
from diffusers import AmusedPipeline

pipe = AmusedPipeline.from_pretrained(folder, torch_dtype=torch.float32)
image = pipe(prompt, generator=torch.Generator().manual_seed(8)).images[0]
image.save(out)
"""
OUR_USAGE = SEED_USAGE.replace("from diffusers import AmusedPipeline", "from muse import Pipeline as AmusedPipeline")


def run_usage(code: str, folder: str, out) -> object:
    namespace = {"folder": folder, "prompt": PROMPT, "out": out}
    exec(code, namespace)
    return namespace["pipe"]


@pytest.mark.slow
def test_the_seed_usage_runs_unchanged_and_gives_the_reference_image(published_dirs, tmp_path):
    folder = str(published_dirs("tiny-256"))
    theirs = run_usage(SEED_USAGE, folder, tmp_path / "theirs.png")
    ours = run_usage(OUR_USAGE, folder, tmp_path / "ours.png")
    assert isinstance(ours, Pipeline)
    a, b = (np.asarray(PIL.Image.open(tmp_path / f"{n}.png")) for n in ("theirs", "ours"))
    assert a.shape == b.shape and np.array_equal(a, b)
    # and the tokens under the images are the reference's
    theirs.set_progress_bar_config(disable=True)
    t = theirs(PROMPT, generator=torch.Generator().manual_seed(8), output_type="latent").images
    o = ours(PROMPT, generator=torch.Generator().manual_seed(8), output_type="latent", progress_bar=False)
    assert torch.equal(t.reshape(o.shape).cpu(), o.cpu())


def test_variant_and_torch_dtype_load_the_fp16_files(published_dirs):
    pipe = Pipeline.from_pretrained(str(published_dirs("tiny-256")), variant="fp16", torch_dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16
    with pytest.raises(ValueError, match="disagree"):
        Pipeline.from_pretrained(str(published_dirs("tiny-256")), dtype=torch.float32, torch_dtype=torch.float16)


@pytest.mark.slow
def test_np_output_answers_images_as_diffusers_output_does(published_dirs):
    pipe = Pipeline.from_pretrained(str(published_dirs("tiny-256")))
    out = pipe(
        PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np", progress_bar=False
    )
    assert isinstance(out, np.ndarray) and out.images is out and out.images[0].shape == out.shape[1:]
    pil = pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2, progress_bar=False)
    assert pil.images is pil and np.array_equal(np.asarray(pil.images[0]), np.asarray(pil[0]))


@pytest.mark.slow
def test_load_lora_weights_and_to_take_diffusers_arguments(published_dirs, tmp_path):
    folder = str(published_dirs("tiny-256"))
    pipe = Pipeline.from_pretrained(folder)
    adapted = Pipeline.from_pretrained(folder).transformer
    inject_lora(adapted, ["to_q", "to_v"], rank=2, alpha=2)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    save_lora(adapted, tmp_path / "adapter", fmt="peft")  # pytorch_lora_weights.safetensors, as diffusers writes it
    ids = torch.full((1, 4, 4), pipe.mask_token_id)
    before = pipe.transformer(ids, *_text(pipe))
    pipe.load_lora_weights(tmp_path / "adapter", weight_name="pytorch_lora_weights.safetensors")
    after = pipe.transformer(ids, *_text(pipe))
    assert not torch.allclose(before, after)
    assert torch.allclose(after, adapted(ids, *_text(pipe)), atol=1e-6)
    assert pipe.to("cpu") is pipe and pipe.to(torch.bfloat16).transformer.dtype == torch.bfloat16


def _text(pipe):
    embeds, hidden = pipe.encode_prompt(PROMPT)
    micro = torch.tensor([[32.0, 32.0, 0.0, 0.0, 6.0]])
    return hidden, embeds, micro
