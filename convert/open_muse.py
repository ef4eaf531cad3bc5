"""The original open-muse checkpoints -> ours: the `MaskGiTUViT_v2` transformer and the taming-style `VQGANModel`.

What an open-muse checkpoint folder is (our assumption, documented in the README):

    DIR/
      transformer/config.json        "_class_name": "MaskGiTUViT_v2" (or "MaskGiTUViT" with the same tensor layout)
      transformer/pytorch_model.bin  or model.safetensors / diffusion_pytorch_model.safetensors
      vae/ (or vqvae/)               config.json with "_class_name": "VQGANModel", and its weights
      text_encoder/                  a transformers CLIPTextModelWithProjection (config.json + weights)
      tokenizer/                     optional: rebuilt offline when absent

It is recognised by `transformer/config.json` naming a MaskGiTUViT class. Pickled weights are read only through the
weights-only unpickler. There is no scheduler config: the mask id is vocab_size - 1 and the schedule cosine, as in
open-muse.

Names are mapped through diffusers' names: ours -> diffusers (`convert.diffusers_keys`) ->
open-muse (the renames below). The one tensor that is not a rename is the GEGLU input projection: open-muse computes
`gelu(wi_0 x) * wi_1 x`, diffusers and we keep one matrix whose first half is the value (wi_1) and whose second half
is the gate (wi_0), so ours = cat([wi_1, wi_0], dim=0).

Config: every size that the tensors determine is read from their shapes (and checked against config.json when it
states it). What shapes cannot tell (attention heads, the micro-condition sinusoid width, the norm epsilon) comes
from config.json; for `MaskGiTUViT_v2` a field it lacks takes that class's documented default (the aMUSEd values),
for any other class it must be present, or loading stops with an error naming the field.
Open-muse models take flat (B, L) token sequences and return (B, L, K) logits; ours take (B, h, w) grids:
`forward_flat` gives the original interface on our model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from uvit import UViT, UViTConfig
from vqgan import VQGAN, VQGANConfig

from .components import Components, default_scheduler_config
from .diffusers_keys import UVIT_KEYMAP, VQGAN_KEYMAP
from .mapping import ConversionError, KeyMap, Layout, to_ours
from .meta_init import empty_modules
from .safe_load import CheckpointError, read_json, read_weights
from .text_encoder import load_text_encoder, load_tokenizer

log = logging.getLogger(__name__)

UVIT_CLASSES = ("MaskGiTUViT_v2", "MaskGiTUViT")
VQ_CLASSES = ("VQGANModel",)
WEIGHT_NAMES = (
    "pytorch_model.bin",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.safetensors",
)
VQ_FOLDERS = ("vae", "vqvae")


# --- name maps -----------------------------------------------------------------------------------------------------


@dataclass
class RenamedKeyMap(KeyMap):
    """A KeyMap that renames the names of a `base` KeyMap: ours -> base name -> the first matching rule here.
    A rule's replacement may be a function of the match (for index arithmetic). Layouts are the base's."""

    base: KeyMap | None = None

    def theirs(self, ours: str) -> str:
        name = self.base.theirs(ours)
        for pattern, repl in self.rules:
            if re.fullmatch(pattern, name):
                return re.sub(pattern, repl, name)
        return name

    def layout(self, ours: str) -> Layout:
        return self.base.layout(ours)


# diffusers UVit2DModel names -> open-muse MaskGiTUViT_v2 names
GEGLU_PAIR = "wi_1+wi_0"  # the name under which the two open-muse halves are joined before loading
_BLOCK = r"(down|up)_block\."
OPEN_MUSE_UVIT_KEYMAP = RenamedKeyMap(
    base=UVIT_KEYMAP,
    rules=[
        (r"cond_embed\.linear_1\.(.*)", r"cond_embed.0.\1"),
        (r"cond_embed\.linear_2\.(.*)", r"cond_embed.2.\1"),
        # transformer layers
        (r"transformer_layers\.(\d+)\.norm1\.norm\.(.*)", r"transformer_layers.\1.attn_layer_norm.\2"),
        (
            r"transformer_layers\.(\d+)\.norm1\.linear\.(.*)",
            r"transformer_layers.\1.self_attn_adaLN_modulation.mapper.\2",
        ),
        (r"transformer_layers\.(\d+)\.norm2\.norm\.(.*)", r"transformer_layers.\1.crossattn_layer_norm.\2"),
        (
            r"transformer_layers\.(\d+)\.norm2\.linear\.(.*)",
            r"transformer_layers.\1.cross_attn_adaLN_modulation.mapper.\2",
        ),
        (r"transformer_layers\.(\d+)\.norm3\.norm\.(.*)", r"transformer_layers.\1.ffn.pre_mlp_layer_norm.\2"),
        (r"transformer_layers\.(\d+)\.norm3\.linear\.(.*)", r"transformer_layers.\1.ffn.adaLN_modulation.mapper.\2"),
        (
            r"transformer_layers\.(\d+)\.attn1\.to_(q|k|v)\.(.*)",
            lambda m: f"transformer_layers.{m[1]}.attention.{_QKV[m[2]]}.{m[3]}",
        ),
        (r"transformer_layers\.(\d+)\.attn1\.to_out\.0\.(.*)", r"transformer_layers.\1.attention.out.\2"),
        (
            r"transformer_layers\.(\d+)\.attn2\.to_(q|k|v)\.(.*)",
            lambda m: f"transformer_layers.{m[1]}.crossattention.{_QKV[m[2]]}.{m[3]}",
        ),
        (r"transformer_layers\.(\d+)\.attn2\.to_out\.0\.(.*)", r"transformer_layers.\1.crossattention.out.\2"),
        (r"transformer_layers\.(\d+)\.ff\.net\.0\.proj\.(.*)", rf"transformer_layers.\1.ffn.{GEGLU_PAIR}.\2"),
        (r"transformer_layers\.(\d+)\.ff\.net\.2\.(.*)", r"transformer_layers.\1.ffn.wo.\2"),
        # conv stages
        (_BLOCK + r"downsample\.norm\.(.*)", r"down_blocks.0.downsample.0.norm.\2"),
        (_BLOCK + r"downsample\.conv\.(.*)", r"down_blocks.0.downsample.1.\2"),
        (_BLOCK + r"upsample\.norm\.(.*)", r"up_blocks.0.upsample.0.norm.\2"),
        (_BLOCK + r"upsample\.conv\.(.*)", r"up_blocks.0.upsample.1.\2"),
        (_BLOCK + r"res_blocks\.(\d+)\.norm\.(.*)", r"\1_blocks.0.res_blocks.\2.norm.norm.\3"),
        (_BLOCK + r"res_blocks\.(\d+)\.channelwise_linear_1\.(.*)", r"\1_blocks.0.res_blocks.\2.channelwise.0.\3"),
        (_BLOCK + r"res_blocks\.(\d+)\.channelwise_norm\.(.*)", r"\1_blocks.0.res_blocks.\2.channelwise.2.\3"),
        (_BLOCK + r"res_blocks\.(\d+)\.channelwise_linear_2\.(.*)", r"\1_blocks.0.res_blocks.\2.channelwise.4.\3"),
        (
            _BLOCK + r"res_blocks\.(\d+)\.cond_embeds_mapper\.(.*)",
            r"\1_blocks.0.res_blocks.\2.adaLN_modulation.mapper.\3",
        ),
        (_BLOCK + r"res_blocks\.(\d+)\.(.*)", r"\1_blocks.0.res_blocks.\2.\3"),
        (_BLOCK + r"attention_blocks\.(\d+)\.norm1\.(.*)", r"\1_blocks.0.attention_blocks.\2.attn_layer_norm.\3"),
        (_BLOCK + r"attention_blocks\.(\d+)\.norm2\.(.*)", r"\1_blocks.0.attention_blocks.\2.crossattn_layer_norm.\3"),
        (
            _BLOCK + r"attention_blocks\.(\d+)\.attn1\.to_(q|k|v)\.(.*)",
            lambda m: f"{m[1]}_blocks.0.attention_blocks.{m[2]}.attention.{_QKV[m[3]]}.{m[4]}",
        ),
        (
            _BLOCK + r"attention_blocks\.(\d+)\.attn1\.to_out\.0\.(.*)",
            r"\1_blocks.0.attention_blocks.\2.attention.out.\3",
        ),
        (
            _BLOCK + r"attention_blocks\.(\d+)\.attn2\.to_(q|k|v)\.(.*)",
            lambda m: f"{m[1]}_blocks.0.attention_blocks.{m[2]}.crossattention.{_QKV[m[3]]}.{m[4]}",
        ),
        (
            _BLOCK + r"attention_blocks\.(\d+)\.attn2\.to_out\.0\.(.*)",
            r"\1_blocks.0.attention_blocks.\2.crossattention.out.\3",
        ),
        (_BLOCK + r"attention_blocks\.(\d+)\.(.*)", r"\1_blocks.0.attention_blocks.\2.\3"),
        # head
        (r"mlm_layer\.layer_norm\.(.*)", r"mlm_layer.layer_norm.norm.\1"),
    ],
)
_QKV = {"q": "query", "k": "key", "v": "value"}


def open_muse_vqgan_keymap(num_levels: int) -> RenamedKeyMap:
    """diffusers VQModel names -> taming names. The decoder's levels run in the opposite order in taming:
    diffusers up_blocks.k is taming up.{num_levels - 1 - k}."""

    def up(k: str) -> int:
        return num_levels - 1 - int(k)

    return RenamedKeyMap(
        base=VQGAN_KEYMAP,
        rules=[
            (
                r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)",
                r"encoder.down.\1.block.\2.nin_shortcut.\3",
            ),
            (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", r"encoder.down.\1.block.\2.\3"),
            (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", r"encoder.down.\1.downsample.conv.\2"),
            (
                r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)",
                lambda m: f"decoder.up.{up(m[1])}.block.{m[2]}.nin_shortcut.{m[3]}",
            ),
            (
                r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
                lambda m: f"decoder.up.{up(m[1])}.block.{m[2]}.{m[3]}",
            ),
            (
                r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
                lambda m: f"decoder.up.{up(m[1])}.upsample.conv.{m[2]}",
            ),
            (
                r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.conv_shortcut\.(.*)",
                lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.nin_shortcut.{m[3]}",
            ),
            (
                r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)",
                lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}",
            ),
            (r"(encoder|decoder)\.conv_norm_out\.(.*)", r"\1.norm_out.\2"),
        ],
    )


# --- state dicts ---------------------------------------------------------------------------------------------------


def join_geglu_halves(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open-muse's separate `ffn.wi_0` (gate) and `ffn.wi_1` (value) -> one `ffn.wi_1+wi_0` = cat([wi_1, wi_0]).
    A half without its partner is left as it is, so that loading reports it (and the missing partner) by name."""
    out = dict(state_dict)
    for key in list(state_dict):
        m = re.fullmatch(r"(.*\.ffn)\.wi_0\.(weight|bias)", key)
        if m and f"{m[1]}.wi_1.{m[2]}" in state_dict:
            value, gate = out.pop(f"{m[1]}.wi_1.{m[2]}"), out.pop(key)
            out[f"{m[1]}.{GEGLU_PAIR}.{m[2]}"] = torch.cat([value, gate], dim=0)
    return out


# --- configs -------------------------------------------------------------------------------------------------------

# UViTConfig fields the tensor shapes cannot tell (MaskGiTUViT_v2 config.json uses the same names)
_NOT_FROM_SHAPES = (
    "num_attention_heads",
    "block_num_heads",
    "micro_cond_encode_dim",
    "layer_norm_eps",
    "hidden_dropout",
    "attention_dropout",
)


def _one(value, field: str, where):
    """open-muse keeps some per-block settings as 1-element lists."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise CheckpointError(
                f"{where}: {field}={list(value)}: aMUSEd's U-ViT has one conv stage, expected one value"
            )
        return value[0]
    return value


def uvit_config_from_open_muse(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], where="config.json"
) -> UViTConfig:
    """A UViTConfig for an open-muse MaskGiTUViT checkpoint: sizes from the tensor shapes (checked against the
    config where it states them), the rest from the config (see the module docstring)."""
    cls = config.get("_class_name", "MaskGiTUViT_v2")
    if cls not in UVIT_CLASSES:
        raise CheckpointError(f"{where}: _class_name {cls!r} is not an open-muse U-ViT ({', '.join(UVIT_CLASSES)})")
    if config.get("norm_type", "rmsnorm" if cls == "MaskGiTUViT_v2" else None) != "rmsnorm":
        raise CheckpointError(
            f"{where}: norm_type {config.get('norm_type')!r} is not supported: aMUSEd's U-ViT uses 'rmsnorm'"
        )
    if config.get("use_fused_mlp", False):
        raise CheckpointError(f"{where}: use_fused_mlp=true (a GELU MLP without the gated half) is not aMUSEd's U-ViT")

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise CheckpointError(f"{where}: cannot infer the U-ViT's sizes: the weights have no {key!r}")
        return state_dict[key].shape

    def count(pattern: str) -> int:
        return len({m[1] for k in state_dict if (m := re.fullmatch(pattern, k))})

    hidden, encoder_hidden = shape("encoder_proj.weight")
    vocab, in_channels = shape("embed.embeddings.weight")
    cond_in = shape("cond_embed.0.weight")[1]
    inferred = dict(
        hidden_size=hidden,
        encoder_hidden_size=encoder_hidden,
        vocab_size=vocab,
        in_channels=in_channels,
        block_out_channels=shape("embed.conv.weight")[0],
        codebook_size=shape("mlm_layer.conv2.weight")[0],
        num_hidden_layers=count(r"transformer_layers\.(\d+)\.attention\.query\.weight"),
        num_res_blocks=count(r"down_blocks\.0\.res_blocks\.(\d+)\.depthwise\.weight"),
        intermediate_size=shape("transformer_layers.0.ffn.wi_0.weight")[0],
        downsample="down_blocks.0.downsample.1.weight" in state_dict,
        use_bias="encoder_proj.bias" in state_dict,
        ln_elementwise_affine="encoder_proj_layer_norm.weight" in state_dict,
    )
    inferred["upsample"] = inferred["downsample"]
    stated = dict(config)
    if "block_out_channels" in stated:
        stated["block_out_channels"] = _one(stated["block_out_channels"], "block_out_channels", where)
    if "block_num_heads" in stated:
        stated["block_num_heads"] = _one(stated["block_num_heads"], "block_num_heads", where)
    if "force_down_up_sample" in stated:
        stated["downsample"] = stated["upsample"] = bool(stated["force_down_up_sample"])
    mismatched = [
        f"{k}={stated[k]!r} but the weights have {v!r}" for k, v in inferred.items() if k in stated and stated[k] != v
    ]
    if mismatched:
        raise CheckpointError(f"{where} does not match its weights: " + "; ".join(mismatched))

    defaults = UViTConfig()  # = MaskGiTUViT_v2Config's defaults for these fields (the aMUSEd values)
    values = dict(inferred)
    for field in _NOT_FROM_SHAPES:
        if field in stated:
            values[field] = stated[field]
        elif cls == "MaskGiTUViT_v2":
            values[field] = getattr(defaults, field)
        else:
            raise CheckpointError(
                f"{where}: {cls} config lacks {field!r}, which the weights cannot tell; add it to config.json"
            )
    # the split of the conditioning input between the pooled text embedding and the micro-conditions
    if "cond_embed_dim" in stated and "micro_cond_embed_dim" in stated:
        values["cond_embed_dim"], values["micro_cond_embed_dim"] = (
            stated["cond_embed_dim"],
            stated["micro_cond_embed_dim"],
        )
    elif "cond_embed_dim" in stated:
        values["cond_embed_dim"] = stated["cond_embed_dim"]
        values["micro_cond_embed_dim"] = cond_in - stated["cond_embed_dim"]
    elif cls == "MaskGiTUViT_v2":
        values["micro_cond_embed_dim"] = stated.get("micro_cond_embed_dim", defaults.micro_cond_embed_dim)
        values["cond_embed_dim"] = cond_in - values["micro_cond_embed_dim"]
    else:
        raise CheckpointError(
            f"{where}: {cls} config lacks 'cond_embed_dim', which the weights cannot tell; add it to config.json"
        )
    if values["cond_embed_dim"] + values["micro_cond_embed_dim"] != cond_in:
        raise CheckpointError(
            f"{where} does not match its weights: cond_embed_dim {values['cond_embed_dim']} + micro_cond_embed_dim "
            f"{values['micro_cond_embed_dim']} != {cond_in}, the input width of cond_embed.0.weight"
        )
    if "mask_token_id" in stated and stated["mask_token_id"] != vocab - 1:
        raise CheckpointError(f"{where}: mask_token_id {stated['mask_token_id']} is not vocab_size - 1 = {vocab - 1}")
    # open-muse configs carry no default image size: 16x16 tokens (256 px), or 32x32 when the conv stages resample
    values["sample_size"] = stated.get("sample_size", 32 if values["downsample"] else 16)
    try:
        return UViTConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def vqgan_config_from_open_muse(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], where="config.json"
) -> VQGANConfig:
    """A VQGANConfig for a taming-style open-muse VQGANModel: every size from the tensor shapes, checked against
    the config. Taming's GroupNorm always has 32 groups; a config may state `norm_num_groups` otherwise (our
    extension, for small test models: the weights cannot tell the group count)."""
    cls = config.get("_class_name", "VQGANModel")
    if cls not in VQ_CLASSES:
        raise CheckpointError(
            f"{where}: _class_name {cls!r} is not a taming-style open-muse VQ-GAN ({', '.join(VQ_CLASSES)})"
        )
    attn = sorted(k for k in state_dict if ".attn" in k)
    if attn:
        raise CheckpointError(
            f"{where}: attention blocks in the VQ-GAN ({attn[0]}, ...) are not part of aMUSEd's VQ-GAN and not supported"
        )
    if not config.get("resample_with_conv", True):
        raise CheckpointError(
            f"{where}: resample_with_conv=false is not supported (aMUSEd's VQ-GAN resamples with convs)"
        )

    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"{where}: cannot infer the VQ-GAN's sizes: the weights have no {key!r}")
        return state_dict[key].shape

    hidden, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m[1]) for k in state_dict if (m := re.fullmatch(r"encoder\.down\.(\d+)\..*", k))})
    if levels != list(range(len(levels))) or not levels:
        raise CheckpointError(f"{where}: encoder levels {levels} are not 0..n-1")
    channels = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    blocks = len({m[1] for k in state_dict if (m := re.fullmatch(r"encoder\.down\.0\.block\.(\d+)\..*", k))})
    z_channels = shape("encoder.conv_out.weight")[0]
    num_codes, embed_dim = shape("quantize.embedding.weight")
    inferred = dict(
        num_channels=in_channels,
        hidden_channels=hidden,
        channel_mult=[c // hidden for c in channels],
        num_res_blocks=blocks,
        z_channels=z_channels,
        num_embeddings=num_codes,
        quantized_embed_dim=embed_dim,
    )
    if any(c % hidden for c in channels):
        raise CheckpointError(f"{where}: level widths {channels} are not multiples of hidden_channels {hidden}")
    stated = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()}
    mismatched = [
        f"{k}={stated[k]!r} but the weights have {v!r}" for k, v in inferred.items() if k in stated and stated[k] != v
    ]
    if mismatched:
        raise CheckpointError(f"{where} does not match its weights: " + "; ".join(mismatched))
    try:
        return VQGANConfig(
            in_channels=in_channels,
            out_channels=shape("decoder.conv_out.weight")[0],
            block_out_channels=tuple(channels),
            layers_per_block=blocks,
            latent_channels=z_channels,
            num_vq_embeddings=num_codes,
            vq_embed_dim=None if embed_dim == z_channels else embed_dim,
            norm_num_groups=int(config.get("norm_num_groups", 32)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


# --- networks ------------------------------------------------------------------------------------------------------


def uvit_from_open_muse(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype=None, what="open-muse U-ViT"
) -> UViT:
    """An open-muse MaskGiTUViT(_v2) (config.json content + state dict) -> our UViT, every tensor checked."""
    cfg = uvit_config_from_open_muse(config, state_dict, where=what)
    with empty_modules():
        model = UViT(cfg)
    return to_ours(model, OPEN_MUSE_UVIT_KEYMAP, join_geglu_halves(state_dict), what=what, dtype=dtype).eval()


def vqgan_from_open_muse(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], dtype=None, what="open-muse VQ-GAN"
) -> VQGAN:
    """A taming-style open-muse VQGANModel (config.json content + state dict) -> our VQGAN, every tensor checked."""
    cfg = vqgan_config_from_open_muse(config, state_dict, where=what)
    with empty_modules():
        model = VQGAN(cfg)
    keymap = open_muse_vqgan_keymap(len(cfg.block_out_channels))
    return to_ours(model, keymap, state_dict, what=what, dtype=dtype).eval()


def forward_flat(model: UViT, input_ids: torch.Tensor, encoder_hidden_states, cond_embeds, micro_conds) -> torch.Tensor:
    """open-muse's interface on our model: flat token ids (B, L), L a square -> logits (B, L, codebook_size)."""
    B, L = input_ids.shape
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(f"open-muse sequences are square token grids; got length {L}")
    logits = model.forward_channels_last(input_ids.view(B, side, side), encoder_hidden_states, cond_embeds, micro_conds)
    return logits.reshape(B, L, -1)  # (B, h, w, K) -> (B, L, K)


# --- folders -------------------------------------------------------------------------------------------------------


def _class_name(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_open_muse_folder(folder: Path) -> bool:
    return _class_name(Path(folder) / "transformer" / "config.json") in UVIT_CLASSES


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")


def _load_network(folder: Path, build: Callable, dtype, what: str):
    config_path = folder / "config.json"
    config = read_json(config_path, f"{what} config")
    weights = _weights_file(folder)
    try:
        return build(config, read_weights(weights), dtype=dtype, what=f"{weights}")
    except ConversionError as e:  # CheckpointError included
        raise CheckpointError(f"{e} (config: {config_path})") from None


def load_open_muse(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    progress=None,
    networks=Components.MODULES,
) -> Components:
    """An open-muse checkpoint folder (layout in the module docstring) -> our Components; only the `networks` named
    are loaded (the others are None)."""
    root = Path(folder)
    if variant:
        log.warning("%s: open-muse checkpoints have no weight variants; ignoring variant=%r", root, variant)
    step = progress or (lambda name: None)
    transformer = vqvae = text_encoder = None
    if "transformer" in networks:
        step("transformer")
        transformer = _load_network(root / "transformer", uvit_from_open_muse, dtype, "open-muse U-ViT")
    if "vqvae" in networks:
        step("vqvae")
        vq_dir = next((root / n for n in VQ_FOLDERS if (root / n).is_dir()), None)
        if vq_dir is None:
            raise CheckpointError(
                f"{root}: the VQ-GAN folder is missing (looked for {' or '.join(n + '/' for n in VQ_FOLDERS)})"
            )
        vqvae = _load_network(vq_dir, vqgan_from_open_muse, dtype, "open-muse VQ-GAN")
    if "text_encoder" in networks:
        step("text_encoder")
        text_encoder = _load_open_muse_text_encoder(root, dtype)
    step("tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer" if (root / "tokenizer").is_dir() else None)
    step("scheduler")
    scheduler = default_scheduler_config(transformer.config.mask_token_id) if transformer is not None else {}
    return Components(transformer, vqvae, text_encoder, tokenizer, scheduler, source=str(root))


def _load_open_muse_text_encoder(root: Path, dtype):
    te_dir = root / "text_encoder"
    if not te_dir.is_dir():
        raise CheckpointError(
            f"{root}: the text_encoder/ folder is missing (a transformers CLIPTextModelWithProjection)"
        )
    te_weights = next((te_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (te_dir / n).is_file()), None)
    if te_weights is None:
        raise CheckpointError(f"{te_dir}: no weights file (looked for model.safetensors, pytorch_model.bin)")
    return load_text_encoder(te_dir, read_weights(te_weights), te_weights, dtype)
