"""Configuration of the VQ-GAN tokenizer, with the published aMUSEd VQ-GAN as a preset.

Field names follow the diffusers `VQModel` config so a `vqvae/config.json` reads straight in
(`VQGANConfig.from_dict`); structural options we do not implement are refused there with a clear error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# the sizes and counts, which must be positive
_POSITIVE = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "num_vq_embeddings",
    "norm_num_groups",
    "sample_size",
)


@dataclass
class VQGANConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)  # one level per entry, encoder order
    layers_per_block: int = 2  # ResNet blocks per encoder level; the decoder has one more per level
    latent_channels: int = 64
    num_vq_embeddings: int = 8192  # codebook size
    vq_embed_dim: int | None = None  # codebook vector width; None = latent_channels
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 32  # unused by the model; kept for round trips of diffusers configs
    scaling_factor: float = 0.18215  # unused by aMUSEd; kept for round trips
    lookup_from_codebook: bool = True
    force_upcast: bool = True

    def __post_init__(self):
        problems = _type_problems(self)
        if not problems:
            problems = self._range_problems()
        if problems:  # the divisibility checks below need positive integers
            raise ValueError("invalid VQGANConfig: " + "; ".join(problems))
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.scaling_factor = float(self.scaling_factor)
        if self.act_fn != "silu":
            problems.append(f"act_fn {self.act_fn!r} is not supported (only 'silu')")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                problems.append(
                    f"block_out_channels entry {c} is not divisible by norm_num_groups {self.norm_num_groups}"
                )
        if not self.block_out_channels:
            problems.append("block_out_channels is empty")
        if problems:
            raise ValueError("invalid VQGANConfig: " + "; ".join(problems))

    def _range_problems(self) -> list[str]:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in _POSITIVE if getattr(self, name) < 1]
        if self.layers_per_block < 0:  # 0: an encoder of convolutions and resampling only (the decoder keeps one block)
            problems.append(f"layers_per_block must be >= 0, got {self.layers_per_block}")
        if self.layers_per_block == 0 and len(set(self.block_out_channels)) > 1:
            # without a ResNet block an encoder level has nothing that changes its width
            problems.append(
                f"layers_per_block 0 needs equal block_out_channels (no block changes a level's width), "
                f"got {list(self.block_out_channels)}"
            )
        if self.vq_embed_dim is not None and self.vq_embed_dim < 1:
            problems.append(f"vq_embed_dim must be >= 1 or null, got {self.vq_embed_dim}")
        if any(c < 1 for c in self.block_out_channels):
            problems.append(f"block_out_channels entries must be >= 1, got {list(self.block_out_channels)}")
        return problems

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # --- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def amused(cls) -> "VQGANConfig":
        """The VQ-GAN shared by amused-256 and amused-512: 146,244,675 parameters, factor 16, 8192 codes of 64."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "VQGANConfig":
        base = dict(
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            latent_channels=8,
            num_vq_embeddings=64,
            norm_num_groups=8,
        )
        base.update(overrides)
        return cls(**base)

    # --- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    # diffusers options that have one supported value, and that value
    _FIXED = {
        "norm_type": "group",
        "mid_block_add_attention": False,
    }

    @classmethod
    def from_dict(cls, config: dict, strict: bool = False) -> "VQGANConfig":
        """Build from a dict such as a diffusers `vqvae/config.json`; refuses layouts this implementation lacks."""
        for key, supported in cls._FIXED.items():
            if key in config and config[key] != supported:
                raise ValueError(f"VQ-GAN config {key}={config[key]!r} is not supported (only {supported!r})")
        n = len(config.get("block_out_channels", cls().block_out_channels))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in config:
                types = list(config[key])
                if any(t != block for t in types):
                    raise ValueError(f"VQ-GAN config {key}={types} is not supported (only {block!r} blocks)")
                if len(types) != n:
                    raise ValueError(f"VQ-GAN config has {len(types)} {key} but {n} block_out_channels")
        names = {f.name for f in dataclasses.fields(cls)}
        known = names | set(cls._FIXED) | {"down_block_types", "up_block_types"}
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown and strict:
            raise ValueError(f"unknown VQ-GAN config keys: {unknown}")
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers_dict(self) -> dict:
        """The diffusers `VQModel` config for this model."""
        d = self.to_dict()
        n = len(self.block_out_channels)
        d.update(
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            **self._FIXED,
        )
        return d


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
