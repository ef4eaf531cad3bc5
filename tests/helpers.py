"""Shared builders for the parity tests: reference (diffusers) components with random, non-trivial weights,
saved in the published folder layout. Nothing here downloads anything."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convert.clip_tokenizer import write_clip_tokenizer_files
from uvit import UViTConfig
from vqgan import VQGANConfig

warnings.filterwarnings("ignore", category=FutureWarning)

# Published text tower (CLIP ViT-L/14) and a tiny one of the same layout.
CLIP_FULL = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)

KINDS = ("tiny-256", "tiny-512", "full-256", "full-512")


def uvit_config(kind: str) -> UViTConfig:
    size, layout = kind.split("-")
    if size == "full":
        return UViTConfig.amused_256() if layout == "256" else UViTConfig.amused_512()
    ds = layout == "512"
    return UViTConfig.tiny(downsample=ds, upsample=ds)


def vqgan_config(kind: str) -> VQGANConfig:
    return VQGANConfig.amused() if kind.startswith("full") else VQGANConfig.tiny()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Give every parameter a non-trivial random value: matrices ~ N(0, scale / fan_in), norm weights 1 + N(0, 0.1),
    everything that starts at zero (biases, GRN gamma/beta, modulation) ~ N(0, 0.1 * scale).
    Fan-in scaling keeps a deep random network's activations in a sane range so parity checks mean something."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            if isinstance(_owner(module, name), nn.Embedding):
                fan_in = 1
            std = scale / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("weight"):  # norm weights
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:  # biases, GRN gamma/beta
            p.copy_(0.1 * scale * torch.randn(p.shape, generator=g))
    return module


def _owner(root: nn.Module, param_name: str) -> nn.Module:
    return root.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else root


def reference_uvit(kind: str, seed: int = 0):
    from diffusers import UVit2DModel

    return randomize_(UVit2DModel(**uvit_config(kind).to_diffusers_dict()), seed).eval()


def reference_vqgan(kind: str, seed: int = 1):
    from diffusers import VQModel

    cfg = vqgan_config(kind).to_diffusers_dict()
    return randomize_(VQModel(**cfg), seed, scale=1.0).eval()


def reference_text_encoder(kind: str, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    dims = CLIP_FULL if kind.startswith("full") else CLIP_TINY
    cfg = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **dims,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg).eval()


def reference_pipeline(kind: str, seed: int = 0):
    """A diffusers AmusedPipeline of random weights with the given layout ('tiny-256', 'full-512', ...)."""
    import tempfile

    from diffusers import AmusedPipeline, AmusedScheduler
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    transformer = reference_uvit(kind, seed)
    return AmusedPipeline(
        vqvae=reference_vqgan(kind, seed + 1),
        tokenizer=tokenizer,
        text_encoder=reference_text_encoder(kind, seed + 2),
        transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1),
    )


def save_published(pipe, directory: str | Path, fp16_variant: bool = False) -> Path:
    """Write `pipe` in the published folder layout (fp32 files, and the fp16 variant files too when asked)."""
    d = Path(directory)
    if fp16_variant:
        # Casting to fp16 and back would leave the in-memory reference rounded to fp16 precision: keep the exact
        # fp32 tensors and put them back. Writing the fp32 files last also leaves fp32 in the config.json files
        # (transformers 5 loads a text encoder in the dtype its config names).
        exact = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in _models(pipe).items()}
        pipe.to(torch.float16)
        try:
            pipe.save_pretrained(d, variant="fp16")
        finally:
            pipe.to(torch.float32)
            for name, m in _models(pipe).items():
                m.load_state_dict(exact[name])
            del exact
    pipe.save_pretrained(d)
    return d


def _models(pipe) -> dict[str, nn.Module]:
    return {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}


# --- the command line, as a user runs it -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# the console script `pip install -e .` puts beside the interpreter ([project.scripts] in pyproject.toml)
MUSE_SCRIPT = Path(sys.executable).with_name("muse")


def run_muse(args: list[str], cwd: Path | str = REPO, check: bool = True, **env) -> subprocess.CompletedProcess:
    """`muse ARGS...` in a fresh process, through the installed console script, as a user types it."""
    assert MUSE_SCRIPT.is_file(), f"no console script at {MUSE_SCRIPT}: install the package (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([str(MUSE_SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def muse_main(args: list[str]) -> int:
    """The console script's entry point (`muse.cli.main`) in this process: the same parsing and dispatch as
    `run_muse`, without an interpreter start."""
    from muse.cli import main

    return main(list(args))


# --- parity of whole pipeline calls ------------------------------------------------------------------------------------


class LastTokens:
    """A pipeline callback keeping the tokens after the last step it sees."""

    def __init__(self):
        self.tokens = None

    def __call__(self, step, timestep, tokens):
        self.tokens = tokens.clone()


def run_reference(pipe, seed: int, **kwargs):
    """A diffusers pipeline call -> (final tokens, images as float arrays)."""
    cb = LastTokens()
    images = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", callback=cb, **kwargs).images
    return cb.tokens, images


def run_ours(call, seed: int, *args, **kwargs):
    """One of our pipeline calls (the pipeline itself, or its img2img / inpaint) -> (final tokens, float arrays)."""
    cb = LastTokens()
    images = call(
        *args,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback=cb,
        progress_bar=False,
        **kwargs,
    )
    return cb.tokens, images


def assert_same_outputs(ours_out, theirs_out, pixel_tol: float, varied: bool = False) -> None:
    """Token ids exactly equal, pixels within `pixel_tol`; with `varied`, the images are not flat."""
    (t_ours, im_ours), (t_theirs, im_theirs) = ours_out, theirs_out
    assert t_ours.shape == t_theirs.shape and torch.equal(t_ours, t_theirs)
    assert im_ours.shape == im_theirs.shape and np.abs(im_ours - im_theirs).max() <= pixel_tol
    if varied:
        assert im_ours.std() > 0.05  # a real image, not a constant one (random weights still give varied pixels)


def assert_same_gradients(plain: dict, checkpointed: dict) -> None:
    """Gradient checkpointing recomputes the same arithmetic: every parameter's gradient is bit-equal."""
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
