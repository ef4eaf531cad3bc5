"""Pipeline features beyond the reference's calls: sampling defaults declared by a model folder, LoRA adapters
loaded into a pipeline, torch.compile of the U-ViT call, and CUDA-graph replay of it (GPU only)."""

from __future__ import annotations

import copy

import pytest
import torch

import convert
from muse import Pipeline

PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def components(published_dirs):
    return convert.load_components(str(published_dirs("tiny-256")))


def make_pipe(c, **kwargs) -> Pipeline:
    return Pipeline(copy.deepcopy(c.transformer), c.vqvae, c.text_encoder, c.tokenizer, **kwargs)


def latents(pipe, seed=0, **kwargs):
    return pipe(
        PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="latent", progress_bar=False, **kwargs
    )


# --- sampling defaults declared by a model -------------------------------------------------------------------------


@pytest.mark.slow
def test_declared_defaults_apply_when_the_call_does_not_set_them(components):
    declared = make_pipe(components, sampling_defaults={"guidance_scale": 2.0, "temperature": [1.0, 0.0]})
    plain = make_pipe(components)
    assert torch.equal(latents(declared), latents(plain, guidance_scale=2.0, temperature=(1.0, 0.0)))
    # and they are not the reference's defaults (guidance 10, temperature (2, 0)): the declaration did something
    assert not torch.equal(latents(declared), latents(plain))


@pytest.mark.slow
def test_call_arguments_override_declared_defaults(components):
    declared = make_pipe(components, sampling_defaults={"guidance_scale": 2.0})
    plain = make_pipe(components)
    assert torch.equal(latents(declared, guidance_scale=10.0), latents(plain))


def test_unknown_declared_default_is_refused_at_construction(components):
    # a model folder's bad declaration is a ValueError (what the command line reports as `error: ...`), unlike an
    # unknown keyword argument of a call, which stays a TypeError
    with pytest.raises(ValueError, match="sampling_defaults are invalid: unknown argument.*guidance_scal"):
        make_pipe(components, sampling_defaults={"guidance_scal": 2.0})
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_pipe(components, sampling_defaults={"num_inference_steps": 0})


@pytest.mark.slow
def test_declared_defaults_round_trip_through_our_format(components, tmp_path):
    c = copy.copy(components)
    c.scheduler_config = {**components.scheduler_config, "sampling_defaults": {"guidance_scale": 3.0}}
    convert.save_components(c, tmp_path / "m")
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    assert pipe.sampling_defaults == {"guidance_scale": 3.0}
    assert torch.equal(latents(pipe), latents(make_pipe(components), guidance_scale=3.0))


# --- LoRA adapters -------------------------------------------------------------------------------------------------


def _trained_adapter(c, tmp_path, fmt):
    from convert.lora import inject_lora, save_lora

    model = copy.deepcopy(c.transformer)
    inject_lora(model, ["q", "k", "v"], rank=4, alpha=8)
    with torch.no_grad():  # a non-zero update, as after training (the up-projection starts at zero)
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model, save_lora(model, tmp_path / fmt, fmt=fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["muse", "peft"])
def test_load_lora_gives_the_adapted_model(components, tmp_path, fmt):
    adapted, path = _trained_adapter(components, tmp_path, fmt)
    pipe = make_pipe(components).load_lora(path)
    reference = Pipeline(adapted, components.vqvae, components.text_encoder, components.tokenizer)
    base = latents(make_pipe(components))
    assert torch.equal(latents(pipe), latents(reference))
    assert not torch.equal(latents(pipe), base)  # the adapter changed the images


@pytest.mark.slow
def test_load_lora_merged_equals_unmerged(components, tmp_path):
    _, path = _trained_adapter(components, tmp_path, "muse")
    ids = torch.randint(0, 64, (2, 8, 8))
    ehs, pooled, micro = torch.randn(2, 77, 32), torch.randn(2, 32), torch.tensor([[32.0, 32, 0, 0, 6]] * 2)
    unmerged = make_pipe(components).load_lora(path).transformer(ids, ehs, pooled, micro)
    merged = make_pipe(components).load_lora(path, merge=True).transformer(ids, ehs, pooled, micro)
    assert (merged - unmerged).abs().max() <= 1e-4 * unmerged.abs().max()  # fp32 re-association of W + BA


# --- CUDA graphs ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_matches_eager(components):
    pipe = make_pipe(components).to("cuda")
    eager = pipe(PROMPTS, generator=torch.Generator("cuda").manual_seed(0), output_type="latent", progress_bar=False)
    pipe.enable_cuda_graphs()
    graphed = pipe(PROMPTS, generator=torch.Generator("cuda").manual_seed(0), output_type="latent", progress_bar=False)
    assert torch.equal(eager, graphed)


def test_cuda_graphs_refuse_a_cpu_model(components):
    with pytest.raises(ValueError, match="CUDA device"):
        make_pipe(components).enable_cuda_graphs()


# --- torch.compile ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_transformer_gives_the_eager_tokens(components):
    """`compile_transformer` routes the decoding loop's U-ViT call through torch.compile: the same tokens. (Inductor
    may fuse and reorder fp32 arithmetic, so logits can differ by ulps; at the tiny config no token flips, and the
    tiny test is the one CI can afford: a full-size CPU compile takes minutes.)"""
    eager = latents(make_pipe(components))
    compiled_pipe = make_pipe(components).compile_transformer()
    assert torch.equal(latents(compiled_pipe), eager)
    assert compiled_pipe._transformer_forward is not None  # the compiled call is what ran


@pytest.mark.slow
def test_cli_uses_the_declared_defaults_unless_given(components, tmp_path):
    import numpy as np
    from PIL import Image

    from muse.cli import main

    c = copy.copy(components)
    c.scheduler_config = {**components.scheduler_config, "sampling_defaults": {"guidance_scale": 3.0}}
    convert.save_components(c, tmp_path / "m")
    pipe = make_pipe(components)
    prompt = PROMPTS[0]

    def cli(*extra):
        out = tmp_path / f"cli{len(extra)}.png"
        assert main(["generate", prompt, "--model", str(tmp_path / "m"), "--seed", "0", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out).convert("RGB"))

    def direct(**kw):
        image = pipe(prompt, generator=[torch.Generator().manual_seed(0)], progress_bar=False, **kw)[0]
        return np.asarray(image.convert("RGB"))

    assert np.array_equal(cli(), direct(guidance_scale=3.0))
    assert np.array_equal(cli("--guidance-scale", "10"), direct(guidance_scale=10.0))
