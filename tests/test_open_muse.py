"""open-muse original checkpoints (MaskGiTUViT_v2 + taming VQGANModel) convert to ours and compute what diffusers
computes on the same weights.

The original-layout state dicts are built here from the diffusers reference weights with the renames of the original checkpoints
section 6, written out independently of `convert.open_muse`; their names and shapes are checked against the key
lists of the real checkpoints (tests/data/keys/open_muse_*), and the GEGLU split against open-muse's own
formula gelu(wi_0 x) * wi_1 x. Tolerances as in test_loading (U-ViT logits 1e-4 relative, VQ ids exact, pixels 1e-5).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import convert
from convert.open_muse import forward_flat, uvit_from_open_muse, vqgan_from_open_muse
from tests.helpers import uvit_config, vqgan_config

KEYS = Path(__file__).resolve().parent / "data" / "keys"  # the key lists of the published and original checkpoints


# --- diffusers -> open-muse: the renames of the original checkpoints -------------------------------------------------

_UVIT_RENAMES = [  # applied in order, first match wins; on diffusers UVit2DModel names
    (r"cond_embed\.linear_(\d)\.", lambda m: f"cond_embed.{2 * (int(m[1]) - 1)}."),
    (r"(transformer_layers\.\d+)\.norm1\.norm\.", r"\1.attn_layer_norm."),
    (r"(transformer_layers\.\d+)\.norm1\.linear\.", r"\1.self_attn_adaLN_modulation.mapper."),
    (r"(transformer_layers\.\d+)\.norm2\.norm\.", r"\1.crossattn_layer_norm."),
    (r"(transformer_layers\.\d+)\.norm2\.linear\.", r"\1.cross_attn_adaLN_modulation.mapper."),
    (r"(transformer_layers\.\d+)\.norm3\.norm\.", r"\1.ffn.pre_mlp_layer_norm."),
    (r"(transformer_layers\.\d+)\.norm3\.linear\.", r"\1.ffn.adaLN_modulation.mapper."),
    (r"(transformer_layers\.\d+)\.ff\.net\.2\.", r"\1.ffn.wo."),
    (r"(down|up)_block\.(down|up)sample\.norm\.", r"\1_blocks.0.\2sample.0.norm."),
    (r"(down|up)_block\.(down|up)sample\.conv\.", r"\1_blocks.0.\2sample.1."),
    (r"(down|up)_block\.", r"\1_blocks.0."),
]
_UVIT_PART_RENAMES = [  # then these, anywhere in the name
    ("attn1.to_q.", "attention.query."),
    ("attn1.to_k.", "attention.key."),
    ("attn1.to_v.", "attention.value."),
    ("attn1.to_out.0.", "attention.out."),
    ("attn2.to_q.", "crossattention.query."),
    ("attn2.to_k.", "crossattention.key."),
    ("attn2.to_v.", "crossattention.value."),
    ("attn2.to_out.0.", "crossattention.out."),
    ("channelwise_linear_1.", "channelwise.0."),
    ("channelwise_norm.", "channelwise.2."),
    ("channelwise_linear_2.", "channelwise.4."),
    ("cond_embeds_mapper.", "adaLN_modulation.mapper."),
    ("mlm_layer.layer_norm.", "mlm_layer.layer_norm.norm."),
]


def open_muse_uvit_state_dict(diffusers_sd: dict) -> dict:
    out = {}
    for name, t in diffusers_sd.items():
        m = re.fullmatch(r"(transformer_layers\.\d+)\.ff\.net\.0\.proj\.weight", name)
        if m:  # ff.net.0.proj = cat([wi_1, wi_0]): value half first, gate half second
            value, gate = t.chunk(2, dim=0)
            out[f"{m[1]}.ffn.wi_1.weight"], out[f"{m[1]}.ffn.wi_0.weight"] = value.clone(), gate.clone()
            continue
        for pattern, repl in _UVIT_RENAMES:
            if re.match(pattern, name):
                name = re.sub(pattern, repl, name, count=1)
                break
        for a, b in _UVIT_PART_RENAMES:
            name = name.replace(a, b)
        name = re.sub(r"(res_blocks\.\d+)\.norm\.", r"\1.norm.norm.", name)
        name = re.sub(r"(attention_blocks\.\d+)\.norm1\.", r"\1.attn_layer_norm.", name)
        name = re.sub(r"(attention_blocks\.\d+)\.norm2\.", r"\1.crossattn_layer_norm.", name)
        out[name] = t
    return out


def open_muse_vqgan_state_dict(diffusers_sd: dict, num_levels: int) -> dict:
    out = {}
    for name, t in diffusers_sd.items():
        name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.", name
        )
        name = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.",
            name,
        )
        name = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        out[name] = t
    return out


def open_muse_uvit_config(cfg) -> dict:
    """A MaskGiTUViT_v2 config.json for a diffusers UVit2DModel config (MaskGiTUViT_v2Config's field names)."""
    return {
        "_class_name": "MaskGiTUViT_v2",
        "_version": "0.0.1",
        "hidden_size": cfg.hidden_size,
        "use_bias": cfg.use_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "cond_embed_dim": cfg.cond_embed_dim,
        "micro_cond_encode_dim": cfg.micro_cond_encode_dim,
        "micro_cond_embed_dim": cfg.micro_cond_embed_dim,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "vocab_size": cfg.vocab_size,
        "mask_token_id": cfg.vocab_size - 1,
        "codebook_size": cfg.codebook_size,
        "in_channels": cfg.in_channels,
        "block_out_channels": [cfg.block_out_channels],
        "num_res_blocks": cfg.num_res_blocks,
        "force_down_up_sample": cfg.downsample,
        "block_num_heads": cfg.block_num_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "use_fused_mlp": False,
        "norm_type": "rmsnorm",
        "layer_norm_eps": cfg.layer_norm_eps,
        "ln_elementwise_affine": True,
        "use_fused_residual_norm": False,
        "add_cond_embeds": True,
        "add_micro_cond_embeds": True,
    }


def open_muse_vqgan_config(cfg) -> dict:
    ch = list(cfg.block_out_channels)
    return {
        "_class_name": "VQGANModel",
        "resolution": 256,
        "num_channels": cfg.in_channels,
        "hidden_channels": ch[0],
        "channel_mult": [c // ch[0] for c in ch],
        "num_res_blocks": cfg.layers_per_block,
        "attn_resolutions": [],
        "no_attn_mid_block": True,
        "z_channels": cfg.latent_channels,
        "num_embeddings": cfg.num_vq_embeddings,
        "quantized_embed_dim": cfg.embed_dim,
        "dropout": 0.0,
        "resample_with_conv": True,
        "commitment_cost": 0.25,
        # taming's GroupNorm has 32 groups; the tiny test VQ-GAN has fewer, stated through our extension field
        **({"norm_num_groups": cfg.norm_num_groups} if cfg.norm_num_groups != 32 else {}),
    }


def reference_key_list(filename: str, section: int = 0) -> dict[str, tuple]:
    """name -> shape from a key list file (sections start with '#'; a bare 'count params' line is a header too)."""
    sections, current = [], None
    for line in (KEYS / filename).read_text().splitlines():
        if not line.strip():
            continue
        if re.match(r"\d+ ", line):  # "277 146.244675": tensor and parameter counts
            continue
        if line.startswith("#") or current is None:
            current = {}
            sections.append(current)
            if line.startswith("#"):
                continue
        name, shape = line.split(" ", 1)
        current[name] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return sections[section]


def write_open_muse_folder(pipe, directory: Path, weights: str = "pytorch_model.bin", tokenizer: bool = True) -> Path:
    """An open-muse checkpoint folder (layout in convert/open_muse.py) holding `pipe`'s weights."""
    from safetensors.torch import save_file

    def save(sd, folder: Path):
        folder.mkdir(parents=True)
        sd = {k: v.contiguous() for k, v in sd.items()}
        if weights.endswith(".bin"):
            torch.save(sd, folder / weights)
        else:
            save_file(sd, str(folder / weights))

    tr, vq = pipe.transformer, pipe.vqvae
    save(open_muse_uvit_state_dict(tr.state_dict()), directory / "transformer")
    (directory / "transformer" / "config.json").write_text(json.dumps(open_muse_uvit_config(_uvit_cfg(tr))))
    save(open_muse_vqgan_state_dict(vq.state_dict(), len(vq.config.block_out_channels)), directory / "vae")
    (directory / "vae" / "config.json").write_text(json.dumps(open_muse_vqgan_config(_vq_cfg(vq))))
    pipe.text_encoder.save_pretrained(directory / "text_encoder")
    if tokenizer:
        pipe.tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def _uvit_cfg(model):
    from uvit import UViTConfig

    return UViTConfig.from_dict(dict(model.config))


def _vq_cfg(model):
    from vqgan import VQGANConfig

    return VQGANConfig.from_dict(dict(model.config))


# --- the original names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,section", [("256", 0), ("512", 1)])
def test_built_uvit_state_dict_has_the_original_names_and_shapes(layout, section):
    from diffusers import UVit2DModel

    with torch.device("meta"):
        ref = UVit2DModel(**uvit_config(f"full-{layout}").to_diffusers_dict())
    built = {k: tuple(v.shape) for k, v in open_muse_uvit_state_dict(ref.state_dict()).items()}
    assert built == reference_key_list("open_muse_uvit_v2_keys.txt", section)


def test_built_vqgan_state_dict_has_the_original_names_and_shapes():
    from diffusers import VQModel

    with torch.device("meta"):
        ref = VQModel(**vqgan_config("full-256").to_diffusers_dict())
    built = {k: tuple(v.shape) for k, v in open_muse_vqgan_state_dict(ref.state_dict(), 5).items()}
    assert built == reference_key_list("open_muse_vqgan_f16_8192_keys.txt")


def test_geglu_split_follows_open_muse_formula(reference_pipelines):
    """open-muse's FFN is gelu(wi_0 x) * wi_1 x: the halves split above must reproduce diffusers' GEGLU."""
    ref = reference_pipelines("tiny-256").transformer
    om = open_muse_uvit_state_dict(ref.state_dict())
    x = torch.randn(3, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = ref.transformer_layers[0].ff.net[0](x)
        original = F.gelu(x @ om["transformer_layers.0.ffn.wi_0.weight"].T) * (
            x @ om["transformer_layers.0.ffn.wi_1.weight"].T
        )
    torch.testing.assert_close(original, theirs, rtol=1e-6, atol=1e-6)


# --- conversion and parity ------------------------------------------------------------------------------------


def _uvit_args(cfg, batch=2):
    g = torch.Generator().manual_seed(0)
    side = min(cfg.sample_size, 8)
    ids = torch.randint(0, cfg.codebook_size, (batch, side, side), generator=g)
    ids[:, 1::3] = cfg.mask_token_id
    return (
        ids,
        torch.randn(batch, 77, cfg.encoder_hidden_size, generator=g),
        torch.randn(batch, cfg.cond_embed_dim, generator=g),
        torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]] * batch),
    )


@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512", pytest.param("full-256", marks=pytest.mark.full)])
def test_open_muse_uvit_gives_the_diffusers_logits(kind, reference_pipelines):
    ref = reference_pipelines(kind).transformer
    config = open_muse_uvit_config(_uvit_cfg(ref))
    ours = uvit_from_open_muse(config, open_muse_uvit_state_dict(ref.state_dict()))
    # open-muse configs carry no default image size (sample_size); every other field must come out the same
    assert dataclasses.replace(ours.config, sample_size=ref.config.sample_size) == _uvit_cfg(ref)
    args = _uvit_args(ours.config)
    with torch.no_grad():
        a, b = ours(*args), ref(*args)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("kind", ["tiny-256", pytest.param("full-256", marks=pytest.mark.full)])
def test_open_muse_vqgan_gives_the_diffusers_ids_and_pixels(kind, reference_pipelines):
    ref = reference_pipelines(kind).vqvae
    n = len(ref.config.block_out_channels)
    ours = vqgan_from_open_muse(open_muse_vqgan_config(_vq_cfg(ref)), open_muse_vqgan_state_dict(ref.state_dict(), n))
    f = ours.downsample_factor
    pixels = torch.rand(1, 3, 2 * f, 3 * f, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ids = ours.encode(pixels)
        assert torch.equal(ids, ref.quantize(ref.encode(pixels).latents)[2][2].reshape(ids.shape))
        px = ref.decode(ids, force_not_quantize=True, shape=(*ids.shape, ref.config.latent_channels)).sample
        assert (ours.decode(ids) - px).abs().max().item() <= 1e-5


def test_forward_flat_is_the_original_interface(reference_pipelines):
    ref = reference_pipelines("tiny-256").transformer
    ours = uvit_from_open_muse(open_muse_uvit_config(_uvit_cfg(ref)), open_muse_uvit_state_dict(ref.state_dict()))
    ids, hidden, pooled, micro = _uvit_args(ours.config)
    B, h, w = ids.shape
    with torch.no_grad():
        flat = forward_flat(ours, ids.reshape(B, h * w), hidden, pooled, micro)  # (B, L, K)
        grid = ref(ids, hidden, pooled, micro)  # (B, K, h, w)
    assert flat.shape == (B, h * w, ours.config.codebook_size)
    assert ((flat - grid.flatten(2).transpose(1, 2)).abs().max() / grid.abs().max()).item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_open_muse_folder_loads_through_load_components(weights, reference_pipelines, tmp_path):
    pipe = reference_pipelines("tiny-512")
    folder = write_open_muse_folder(pipe, tmp_path / "om", weights=weights, tokenizer=weights.endswith(".bin"))
    c = convert.load_components(str(folder))
    assert c.scheduler_config == {"mask_token_id": pipe.transformer.config.vocab_size - 1, "masking_schedule": "cosine"}
    assert c.transformer.config.sample_size == 32  # 512 layout: 32x32 tokens by default
    args = _uvit_args(c.transformer.config)
    ids = c.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (
            (c.transformer(*args) - pipe.transformer(*args)).abs().max() / pipe.transformer(*args).abs().max()
        ) <= 1e-4
        assert (c.text_encoder(ids).text_embeds - pipe.text_encoder(ids).text_embeds).abs().max() <= 1e-5
    assert torch.equal(
        ids, pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    )
    enc = convert.load_components(str(folder), networks=("vqvae", "text_encoder"))
    assert enc.transformer is None and enc.scheduler_config == {}
    assert all(torch.equal(v, c.vqvae.state_dict()[k]) for k, v in enc.vqvae.state_dict().items())
    alone = convert.load_components(str(folder), networks=("transformer",))
    assert alone.vqvae is None and alone.text_encoder is None and alone.scheduler_config == c.scheduler_config


# --- what cannot be inferred, and what does not fit ------------------------------------------------------------


def _tiny(reference_pipelines):
    ref = reference_pipelines("tiny-256").transformer
    return open_muse_uvit_config(_uvit_cfg(ref)), open_muse_uvit_state_dict(ref.state_dict())


def test_config_contradicting_the_weights_is_refused(reference_pipelines):
    config, sd = _tiny(reference_pipelines)
    config["hidden_size"] = 128
    with pytest.raises(convert.CheckpointError, match=r"hidden_size=128 but the weights have 64"):
        uvit_from_open_muse(config, sd, what="transformer/pytorch_model.bin")


def test_v1_class_without_the_uninferable_fields_is_refused(reference_pipelines):
    config, sd = _tiny(reference_pipelines)
    config["_class_name"] = "MaskGiTUViT"
    del config["num_attention_heads"]
    with pytest.raises(convert.CheckpointError, match=r"lacks 'num_attention_heads', which the weights cannot tell"):
        uvit_from_open_muse(config, sd)


def test_layernorm_variant_is_refused(reference_pipelines):
    config, sd = _tiny(reference_pipelines)
    config["norm_type"] = "layernorm"
    with pytest.raises(convert.CheckpointError, match="norm_type 'layernorm' is not supported"):
        uvit_from_open_muse(config, sd)


def test_missing_geglu_half_is_named(reference_pipelines):
    config, sd = _tiny(reference_pipelines)
    del sd["transformer_layers.1.ffn.wi_1.weight"]
    with pytest.raises(convert.ConversionError, match=r"transformer_layers\.1\.ffn\.wi_0\.weight"):
        uvit_from_open_muse(config, sd)


def test_v2_config_without_optional_fields_uses_the_class_defaults():
    """A MaskGiTUViT_v2 config.json that lists only what differs from MaskGiTUViT_v2Config's defaults (the
    aMUSEd 256 values) still loads: the defaults fill the heads, eps and micro-condition widths."""
    from diffusers import UVit2DModel

    with torch.device("meta"):
        ref = UVit2DModel(**uvit_config("full-256").to_diffusers_dict())
    sd = {k: torch.empty(v.shape, device="meta") for k, v in open_muse_uvit_state_dict(ref.state_dict()).items()}
    cfg = convert.open_muse.uvit_config_from_open_muse({"_class_name": "MaskGiTUViT_v2"}, sd)
    from uvit import UViTConfig

    assert cfg == UViTConfig.amused_256()
