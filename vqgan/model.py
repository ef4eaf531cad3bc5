"""The VQ-GAN of aMUSEd: pixels in [0, 1] <-> a grid of codebook ids, downsampling factor 2^(levels - 1).

    encode: pixels (B, 3, H, W) -> Encoder -> quant_conv -> latents (B, E, H/f, W/f) -> nearest code -> ids (B, H/f, W/f)
    decode: ids (B, h, w) -> codebook (B, E, h, w) -> post_quant_conv -> Decoder -> pixels (B, 3, h*f, w*f)

Half precision. The reference VQ-GAN overflows fp16 (its residual stream grows past 65504 and the group norms then
produce inf - inf = NaN), so diffusers runs it in fp32. Here the weights and the heavy 3x3 convolutions may be fp16 or
bf16 while the residual stream between blocks stays fp32:
  - group-norm statistics and affine are computed in fp32 from the fp32 stream, then cast to the weights' dtype;
  - residual sums are fp32;
  - a convolution whose input is the unbounded stream (shortcut, resampling) runs on the stream scaled by a power of
    two into the half range and is scaled back in fp32 (`_conv_from_stream`).
In fp32 every one of these steps is the identity, so fp32 results are the reference's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import VQGANConfig

# inputs of a half-precision conv fed from the fp32 stream are scaled to at most this magnitude
_HALF_INPUT_MAX = 16.0


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """GroupNorm with statistics and affine in fp32, whatever the dtypes; result in `out_dtype`."""
    y = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    return y.to(out_dtype)


def _conv_from_stream(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for x from the fp32 stream. With fp32 weights this is conv(x). With half weights, x is divided by a
    power of two s (exact) so that |x / s| <= 16, convolved without bias in half, and rescaled in fp32: s * conv(x / s) + b."""
    if x.dtype == conv.weight.dtype:
        return conv(x)
    amax = x.detach().abs().amax().float().clamp(min=_HALF_INPUT_MAX)
    s = torch.exp2(torch.ceil(torch.log2(amax / _HALF_INPUT_MAX)))
    y = F.conv2d(
        (x / s).to(conv.weight.dtype), conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    y = y.float() * s
    return y if conv.bias is None else y + conv.bias.float().view(1, -1, 1, 1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> dropout -> conv3x3, plus the input (through a 1x1 conv
    when the channel count changes)."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.conv1.weight.dtype
        h = self.conv1(F.silu(_group_norm(self.norm1, x, dt)))
        h = self.conv2(self.dropout(F.silu(_group_norm(self.norm2, h, dt))))
        skip = x if self.shortcut is None else _conv_from_stream(self.shortcut, x)
        return skip + h  # fp32 when x is the fp32 stream


class Downsample(nn.Module):
    """Pad one pixel right and bottom, then a 3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_from_stream(self.conv, F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_from_stream(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResNet blocks, then an optional resampling."""

    def __init__(self, cin: int, cout: int, num_blocks: int, groups: int, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(num_blocks))
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """pixels (B, 3, H, W) -> conv_in -> levels (downsampling) -> 2 mid blocks -> GroupNorm -> SiLU -> conv_out."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, Downsample(ch[i]) if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], g) for _ in range(2))
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, run) -> torch.Tensor:
        dt = self.conv_in.weight.dtype
        x = self.conv_in(x.to(dt)).float()  # the residual stream is fp32 (a no-op for fp32 weights)
        for block in [*self.levels, *self.mid]:
            x = run(block, x)
        return self.conv_out(F.silu(_group_norm(self.norm_out, x, dt)))


class Decoder(nn.Module):
    """latents (B, L, h, w) -> conv_in -> 2 mid blocks -> levels (upsampling) -> GroupNorm -> SiLU -> conv_out."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(ch[0], ch[0], g) for _ in range(2))
        self.levels = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, Upsample(ch[i]) if i < n - 1 else None)
            for i in range(n)
        )
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, run) -> torch.Tensor:
        dt = self.conv_in.weight.dtype
        x = self.conv_in(z.to(dt)).float()
        for block in [*self.mid, *self.levels]:
            x = run(block, x)
        return self.conv_out(F.silu(_group_norm(self.norm_out, x, dt)))


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, E, h, w), straight-through: forward value = codes, gradient flows to the latents
    ids: torch.Tensor  # (B, h, w) long
    codebook_loss: torch.Tensor  # mse(codes, sg(latents)): moves the codebook toward the encoder
    commitment_loss: torch.Tensor  # mse(sg(codes), latents): keeps the encoder near its codes
    loss: torch.Tensor  # commitment_loss + beta * codebook_loss, the reference's weighting


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation against a learned codebook (Euclidean distance)."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(num_codes, dim)

    @property
    def num_codes(self) -> int:
        return self.codebook.num_embeddings

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, E, h, w) -> ids of the nearest codes (B, h, w)."""
        B, E, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, E).float()  # (B*h*w, E)
        return torch.cdist(flat, self.codebook.weight.float()).argmin(dim=1).view(B, h, w)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> code vectors (B, E, h, w), contiguous (a channels-last view would send the whole decoder
        down channels-last convolution kernels, which round differently from the reference)."""
        return self.codebook(ids).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        ids = self.nearest(z)
        zq = self.lookup(ids).to(z.dtype)
        codebook_loss = F.mse_loss(zq, z.detach())
        commitment_loss = F.mse_loss(zq.detach(), z)
        quantized = z + (zq - z).detach()
        return QuantizerOutput(
            quantized, ids, codebook_loss, commitment_loss, commitment_loss + self.beta * codebook_loss
        )


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        cfg = self.config = config
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)
        self.gradient_checkpointing = False

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "VQGAN":
        self.gradient_checkpointing = enabled
        return self

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    # --- continuous pieces (training) ----------------------------------------------------------------------------
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W) in [0, 1] -> latents before quantisation (B, E, H/f, W/f), fp32."""
        self._check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels, self._run)).float()

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """code vectors (B, E, h, w) -> pixels (B, C, h*f, w*f), fp32, not clipped."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)), self._run).float()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction for training: pixels -> latents -> straight-through quantisation -> pixels."""
        q = self.quantizer(self.encode_latents(pixels))
        return self.decode_latents(q.quantized), q

    # --- discrete interface ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W) float in [0, 1], H and W multiples of the downsampling factor -> ids (B, H/f, W/f)."""
        return self.quantizer.nearest(self.encode_latents(pixels))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) long -> pixels (B, C, h*f, w*f) float32 (not clipped)."""
        if ids.dim() != 3 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"ids must be an integer grid (B, h, w), got shape {tuple(ids.shape)} and dtype {ids.dtype}"
            )
        n = self.quantizer.num_codes
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(
                f"ids must lie in [0, {n}); got values in [{int(ids.min())}, {int(ids.max())}] (is a mask id left?)"
            )
        return self.decode_latents(self.quantizer.lookup(ids.long()))

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        cfg, f = self.config, self.downsample_factor
        if pixels.dim() != 4 or pixels.shape[1] != cfg.in_channels:
            raise ValueError(f"pixels must be (B, {cfg.in_channels}, H, W), got shape {tuple(pixels.shape)}")
        H, W = pixels.shape[-2:]
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} is not a multiple of the VQ-GAN's downsampling factor {f}")
        if not pixels.is_floating_point():
            raise ValueError(f"pixels must be float in [0, 1], got dtype {pixels.dtype}")
