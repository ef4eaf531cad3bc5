"""Random-weight aMUSEd folders for the benchmarks (only the shapes matter for speed and memory): the published
layouts at full size or tiny, written in our format or in the published diffusers layout (by our exporter, so no
diffusers is needed). Shared by train_memory.py and train_speed.py; run from a benchmark script, which puts this
folder and the repository on sys.path."""

from __future__ import annotations

from pathlib import Path

import torch

# CLIP ViT-L/14's text tower (the published text encoder) and a tiny one of the same layout
CLIP_FULL = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def random_components(model: str, tiny: bool = False, seed: int = 0):
    """convert.Components of random weights: model "256" or "512" (the published layouts), full size or tiny."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from convert.clip_tokenizer import offline_clip_tokenizer
    from convert.components import Components, default_scheduler_config
    from uvit import UViT, UViTConfig
    from vqgan import VQGAN, VQGANConfig

    torch.manual_seed(seed)
    if tiny:
        two = model == "512"  # the 512 layout resamples the token grid
        uvit = UViTConfig.tiny(downsample=two, upsample=two)
    else:
        uvit = UViTConfig.amused_256() if model == "256" else UViTConfig.amused_512()
    transformer = UViT(uvit)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            **(CLIP_TINY if tiny else CLIP_FULL),
        )
    )
    vqvae = VQGAN(VQGANConfig.tiny() if tiny else VQGANConfig.amused())
    return Components(
        transformer,
        vqvae,
        text,
        offline_clip_tokenizer(),
        default_scheduler_config(transformer.mask_token_id),
        "random",
    )


def write_random_model(model: str, folder: Path, published: bool = False, tiny: bool = False) -> Path:
    """The folder (written once: kept when it is there) of random weights, in our format or the published layout.
    Written beside its place and renamed into it, so an interrupted write leaves nothing that looks complete."""
    from convert import export_diffusers, save_components

    marker = "model_index.json" if published else "muse.json"
    if (folder / marker).is_file():
        return folder
    comps = random_components(model, tiny)
    tmp = folder.with_name(folder.name + ".tmp")
    (export_diffusers if published else save_components)(comps, tmp)
    tmp.rename(folder)
    return folder


def image_resolution(model: str, tiny: bool = False) -> int:
    """The image side the layout trains on (the tiny VQ-GAN downsamples less: see VQGANConfig.tiny)."""
    if tiny:
        return 32
    return 256 if model == "256" else 512
