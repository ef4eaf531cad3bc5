"""Ours -> a diffusers pipeline folder that diffusers loads and runs unchanged, with identical outputs."""

from __future__ import annotations

import pytest
import torch

import convert


@pytest.fixture(scope="module")
def exported(published_dirs, tmp_path_factory):
    """kind -> (our Components loaded from the published folder, the folder exported from them)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            ours = convert.load_components(str(published_dirs(kind)))
            d = tmp_path_factory.mktemp(f"exported-{kind}")
            files = convert.export_diffusers(ours, d)
            assert all(f.is_file() and str(f).startswith(str(d)) for f in files)
            cache[kind] = ours, d
        return cache[kind]

    return get


def _load_diffusers(folder, **kw):
    from diffusers import AmusedPipeline

    return AmusedPipeline.from_pretrained(folder, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_exported_weights_are_the_reference_weights(kind, exported, reference_pipelines):
    _, folder = exported(kind)
    pipe, ref = _load_diffusers(folder), reference_pipelines(kind)
    for name in ("transformer", "vqvae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in b), name
    for name in ("transformer", "vqvae"):
        public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
        assert public(getattr(pipe, name).config) == public(getattr(ref, name).config), name
    assert pipe.scheduler.config.mask_token_id == ref.scheduler.config.mask_token_id
    assert pipe.scheduler.config.masking_schedule == ref.scheduler.config.masking_schedule


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_exported_components_compute_what_ours_compute(kind, exported):
    ours, folder = exported(kind)
    pipe = _load_diffusers(folder)
    cfg = ours.transformer.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.codebook_size, (2, cfg.sample_size, cfg.sample_size), generator=g)
    args = (
        ids,
        torch.randn(2, 77, cfg.encoder_hidden_size, generator=g),
        torch.randn(2, cfg.cond_embed_dim, generator=g),
        torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]] * 2),
    )
    with torch.no_grad():
        assert torch.equal(ours.transformer(*args), pipe.transformer(*args))
        vq_ids = ids[:1, :4, :4] % ours.vqvae.config.num_vq_embeddings
        theirs = pipe.vqvae.decode(
            vq_ids, force_not_quantize=True, shape=(1, 4, 4, pipe.vqvae.config.latent_channels)
        ).sample
        assert (ours.vqvae.decode(vq_ids) - theirs).abs().max().item() <= 1e-5
    text = ["a red bicycle"]
    assert torch.equal(
        ours.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids,
        pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids,
    )


@pytest.mark.slow
def test_exported_pipeline_generates_the_reference_image(exported, reference_pipelines):
    """A short AmusedPipeline call on the exported folder gives the reference pipeline's image exactly."""
    _, folder = exported("tiny-256")
    pipe, ref = _load_diffusers(folder), reference_pipelines("tiny-256")
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")
    a = pipe("a watercolor fox", generator=torch.Generator().manual_seed(7), **kw).images
    b = ref("a watercolor fox", generator=torch.Generator().manual_seed(7), **kw).images
    assert a.shape == b.shape and torch.equal(a, b)


def test_fp16_variant_export_loads_in_diffusers(exported, tmp_path):
    ours, _ = exported("tiny-512")
    files = convert.export_diffusers(ours, tmp_path / "fp16", variant="fp16")
    names = {f.name for f in files}
    assert {"diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"} <= names
    assert not any(n.endswith(".safetensors") and ".fp16." not in n for n in names)
    pipe = _load_diffusers(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    assert pipe.transformer.dtype == pipe.vqvae.dtype == pipe.text_encoder.dtype == torch.float16
    theirs = pipe.transformer.state_dict()
    ours16 = convert.uvit_to_diffusers(ours.transformer)[1]
    assert all(torch.equal(theirs[k], ours16[k].half()) for k in theirs)


def test_export_round_trips_through_our_loader(exported):
    ours, folder = exported("tiny-512")
    again = convert.load_components(str(folder))
    for name in ("transformer", "vqvae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert again.scheduler_config == ours.scheduler_config
