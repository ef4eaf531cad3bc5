"""Configuration of the U-ViT, with the published aMUSEd models as presets.

Field names follow the diffusers `UVit2DModel` config so that a `transformer/config.json` reads straight into
this dataclass (`UViTConfig.from_dict`); the parameter names of the model itself are ours (see `convert`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# the sizes and counts, which must be positive
_POSITIVE = (
    "hidden_size",
    "cond_embed_dim",
    "micro_cond_encode_dim",
    "micro_cond_embed_dim",
    "encoder_hidden_size",
    "vocab_size",
    "codebook_size",
    "in_channels",
    "block_out_channels",
    "num_res_blocks",
    "block_num_heads",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "sample_size",
)


POSITION_EMBEDDINGS = (None, "sincos")


@dataclass
class UViTConfig:
    # global
    hidden_size: int = 1024  # width of the transformer layers
    use_bias: bool = False  # biases on every Linear/conv (the published models have none)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # conditioning
    cond_embed_dim: int = 768  # pooled text embedding width
    micro_cond_encode_dim: int = 256  # sinusoid width per micro-condition scalar
    micro_cond_embed_dim: int = 1280  # = number of micro-conditions (5) x micro_cond_encode_dim
    encoder_hidden_size: int = 768  # text hidden state width
    # tokens
    vocab_size: int = 8256  # codebook + padding + the mask token (the last id)
    codebook_size: int = 8192  # logits cover only these
    # convolutional stages
    in_channels: int = 768  # token embedding width
    block_out_channels: int = 768  # conv stage width
    num_res_blocks: int = 3
    downsample: bool = False
    upsample: bool = False
    block_num_heads: int = 12
    # transformer
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    # norms
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    # default token grid side (tokens), used by pipelines to pick the default image size
    sample_size: int = 16
    # absolute position of each token (ours; the published models have none, they tell positions apart only through
    # the convolutions' zero padding): None, or "sincos" (fixed 2D sines and cosines of the normalised row and
    # column, added to the token embeddings and again at the transformer's input; no parameters)
    position_embedding: str | None = None
    # ConvNeXt blocks at the token grid after the up-sampling (ours; needs downsample), where the token embedding is
    # added back (a long skip): with the stages at the halved grid, a token's logits otherwise see its neighbours'
    # codes only through the 2x2 cells, four tokens folded into block_out_channels
    full_res_blocks: int = 0

    def __post_init__(self):
        problems = _type_problems(self)
        if not problems:
            problems = self._range_problems()
        if problems:  # the divisibility checks below need positive integers
            raise ValueError("invalid UViTConfig: " + "; ".join(problems))
        self.hidden_dropout, self.attention_dropout = float(self.hidden_dropout), float(self.attention_dropout)
        self.layer_norm_eps = float(self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.block_out_channels % self.block_num_heads:
            problems.append(
                f"block_out_channels {self.block_out_channels} is not divisible by block_num_heads {self.block_num_heads}"
            )
        if self.micro_cond_encode_dim % 2:
            problems.append(f"micro_cond_encode_dim must be even, got {self.micro_cond_encode_dim}")
        if self.micro_cond_embed_dim % self.micro_cond_encode_dim:
            problems.append(
                f"micro_cond_embed_dim {self.micro_cond_embed_dim} is not a multiple of micro_cond_encode_dim {self.micro_cond_encode_dim}"
            )
        if self.codebook_size >= self.vocab_size:
            problems.append(
                f"vocab_size {self.vocab_size} must exceed codebook_size {self.codebook_size} (the mask id is vocab_size - 1)"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            problems.append(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if self.position_embedding and (self.block_out_channels % 4 or self.hidden_size % 4):
            problems.append("position_embedding needs block_out_channels and hidden_size divisible by 4")
        if self.full_res_blocks and not self.downsample:
            problems.append("full_res_blocks needs downsample: without it every block already runs at the token grid")
        if self.downsample != self.upsample:
            problems.append("downsample and upsample must be both on or both off, or the token grid would change size")
        if problems:
            raise ValueError("invalid UViTConfig: " + "; ".join(problems))

    def _range_problems(self) -> list[str]:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in _POSITIVE if getattr(self, name) < 1]
        if self.full_res_blocks < 0:
            problems.append(f"full_res_blocks must be >= 0, got {self.full_res_blocks}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        return problems

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def num_micro_conds(self) -> int:
        return self.micro_cond_embed_dim // self.micro_cond_encode_dim

    @property
    def grid_factor(self) -> int:
        """The token grid side must be a multiple of this (2 when the conv stages down/upsample)."""
        return 2 if self.downsample else 1

    # --- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def amused_256(cls) -> "UViTConfig":
        """The transformer of amused/amused-256: 603,537,664 parameters, 16x16 tokens."""
        return cls(downsample=False, upsample=False, sample_size=16)

    @classmethod
    def amused_512(cls) -> "UViTConfig":
        """The transformer of amused/amused-512: 608,257,792 parameters, 32x32 tokens brought to 16x16 inside."""
        return cls(downsample=True, upsample=True, sample_size=32)

    @classmethod
    def tiny(cls, **overrides) -> "UViTConfig":
        """A small model of the same layout, for tests and the embedded demo."""
        base = dict(
            hidden_size=64,
            cond_embed_dim=32,
            micro_cond_encode_dim=8,
            micro_cond_embed_dim=40,
            encoder_hidden_size=32,
            vocab_size=72,
            codebook_size=64,
            in_channels=32,
            block_out_channels=32,
            num_res_blocks=1,
            block_num_heads=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            sample_size=8,
        )
        base.update(overrides)
        return cls(**base)

    # --- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # fields of ours that diffusers' UVit2DModel does not have, and the value that means "as diffusers"
    _OURS_ONLY = {"position_embedding": None, "full_res_blocks": 0}

    def ours_only(self) -> dict:
        """Our additions this model uses ({field: value}), which diffusers' UVit2DModel lacks; empty when the
        model can be saved in the diffusers layout."""
        return {key: getattr(self, key) for key, plain in self._OURS_ONLY.items() if getattr(self, key) != plain}

    def to_diffusers_dict(self) -> dict:
        """The diffusers `UVit2DModel` config of this model; a ValueError when it uses one of our additions."""
        for key, value in self.ours_only().items():
            raise ValueError(f"{key}={value!r} has no diffusers equivalent (UVit2DModel lacks it)")
        d = self.to_dict()
        for key in self._OURS_ONLY:
            d.pop(key)
        return d

    @classmethod
    def from_dict(cls, config: dict, strict: bool = False) -> "UViTConfig":
        """Build from a dict such as a diffusers `config.json`. Keys starting with `_` (diffusers metadata) are
        ignored; any other unknown key raises when `strict`, and is otherwise ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in names and not k.startswith("_"))
        if unknown and strict:
            raise ValueError(f"unknown U-ViT config keys: {unknown}")
        return cls(**{k: v for k, v in config.items() if k in names})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


# a field's annotation -> (check, what the check wants)
_TYPE_CHECKS = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or null"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(_is_int(c) for c in v), "a list of integers"),
}


def _type_problems(config) -> list[str]:
    """Fields whose value is not of the field's type (a config file saying "four" for a layer count)."""
    problems = []
    for f in dataclasses.fields(config):
        check, wanted = _TYPE_CHECKS[f.type]
        value = getattr(config, f.name)
        if not check(value):
            problems.append(f"{f.name} must be {wanted}, got {value!r}")
    return problems
