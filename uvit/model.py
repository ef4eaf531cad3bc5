"""The U-ViT of aMUSEd: masked image tokens + text -> logits over the VQ codebook.

Data flow (shapes for amused-256; B batch, h x w token grid, L text length):

    ids (B, h, w) -> TokenEmbedding -> (B, h, w, C)            C = block_out_channels, channels last throughout
    -> down stage: [512: RMSNorm + 2x2 stride-2 conv] + n x (ConvNeXtBlock, TextAttentionBlock)
    -> (B, h*w, C) -> RMSNorm -> Linear -> (B, h*w, D)         D = hidden_size
    -> n_layers x TransformerLayer (self-attention, cross-attention to text, GEGLU MLP; adaptive norms)
    -> RMSNorm -> Linear -> (B, h, w, C)
    -> up stage: n x (ConvNeXtBlock, TextAttentionBlock) [512: RMSNorm + 2x2 stride-2 transposed conv]
    -> Head -> logits (B, codebook_size, h, w)

The whole network runs channels-last, so there is no (B, C, H, W) <-> (B, L, C) copy between the convolutional
stages and the attention layers; only the 3x3 depthwise and the 2x2 resampling convs see a permuted view.

Conditioning. Every block that reads the text or the conditioning vector c (ConvNeXt modulations, text attentions,
transformer layers) does so through `prepare(c, text)`: the adaptive-norm (scale, shift) pairs and the keys and values
of its cross-attentions, which depend on the text and micro-conditions only. `UViT.prepare` computes them for all 34
blocks at once; a sampler that calls the model 12 times with the same text (the decoding loop) prepares once and
calls `forward_prepared` at each step. `forward` and `forward_channels_last` prepare each block's conditioning just
before the block runs (inside its gradient checkpoint, when that is on), with the very same operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from .config import UViTConfig

# --- small building blocks -------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim; statistics in fp32, result in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = (x * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return x * self.weight if self.weight is not None else x


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with (B, D) modulation broadcast over every position of x (B, ..., D)."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


class Modulation(NamedTuple):
    """An adaptive norm's (scale, shift) for a batch of conditioning vectors, each (B, dim)."""

    scale: torch.Tensor
    shift: torch.Tensor


def modulation_of(linear: nn.Linear, c: torch.Tensor) -> Modulation:
    """(scale, shift) = Linear(SiLU(c)) split in two, scale first: (B, D_c) -> 2 x (B, dim)."""
    scale, shift = linear(F.silu(c)).chunk(2, dim=-1)
    return Modulation(scale, shift)


class AdaptiveNorm(nn.Module):
    """A norm whose output is modulated by the conditioning vector: norm(x) * (1 + scale) + shift,
    with (scale, shift) = Linear(SiLU(c)) split in two (scale first), prepared once per conditioning."""

    def __init__(self, dim: int, cond_dim: int, kind: str, eps: float, affine: bool, bias: bool):
        super().__init__()
        if kind == "rms":
            self.norm = RMSNorm(dim, eps, affine)
        elif kind == "layer":  # a true mean-centred LayerNorm
            self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias)
        else:
            raise ValueError(f"unknown norm kind {kind!r}")
        self.modulation = nn.Linear(cond_dim, 2 * dim, bias=bias)

    def prepare(self, c: torch.Tensor) -> Modulation:
        return modulation_of(self.modulation, c)

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        return modulate(self.norm(x), mod.scale, mod.shift)


# --- autograd that saves less: the same gradients, to the bit, from fewer saved tensors -------------------------------
# Two products whose gradients autograd computes from a tensor it saves beside their inputs, each recomputed here from
# the inputs instead, with the very ops autograd's backward runs: the GEGLU's GELU(gate) (inner floats per position)
# and the CPU flash attention's output (dim floats per position). Used where autograd records (training) and not
# under torch.compile, whose partitioner makes its own choice; tests/test_uvit_saved.py checks the gradients bit for bit.
SAVE_LESS = True  # off: plain autograd (the tests compare both)


def _records(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors here (and the save-less versions apply)."""
    return (
        SAVE_LESS
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch.compiler.is_compiling()
    )


class _GEGLUProduct(torch.autograd.Function):
    """value * GELU(gate) for the halves of h (..., 2 * inner), saving h alone: the backward recomputes GELU(gate)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        value, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return value * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        value, gate = h.chunk(2, dim=-1)
        grad_value = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * value, gate)
        return torch.cat([grad_value, grad_gate], dim=-1)  # (..., 2 * inner), as the chunk's backward


def geglu_product(h: torch.Tensor) -> torch.Tensor:
    """(..., 2 * inner) -> value * GELU(gate) (..., inner), value the first half (exact erf GELU)."""
    if _records(h):
        return _GEGLUProduct.apply(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


class _CPUFlashAttention(torch.autograd.Function):
    """The CPU flash attention F.scaled_dot_product_attention runs, saving q, k, v and the log-sum-exp but not the
    output: the backward computes the output again (one more attention forward, a few percent of the layer's)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        ctx.save_for_backward(q, k, v, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, logsumexp = ctx.saved_tensors
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, logsumexp, 0.0, False
        )


_FLASH = int(SDPBackend.FLASH_ATTENTION)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v: q (B, heads, L, head_dim), k and v (B, heads, S, head_dim) -> (B, heads, L,
    head_dim), through F.scaled_dot_product_attention (on the CPU in training: the same kernel, saving less, and in
    fp32 when the inputs are bf16)."""
    if q.device.type == "cpu" and _records(q, k, v):
        if q.dtype == torch.bfloat16:
            # the CPU flash kernel's bf16 backward is several times slower than its fp32 one (docs/training.md): train
            # the attention itself in fp32 under autocast; the projections around it stay in bf16
            with torch.autocast("cpu", enabled=False):
                return attention(q.float(), k.float(), v.float()).to(q.dtype)
        if torch._fused_sdp_choice(q, k, v) == _FLASH:
            return _CPUFlashAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


_checkpointed = 0  # > 0 inside a gradient checkpoint (UViT._run), whose own hooks must see every saved tensor


def _in_checkpoint(fn: Callable) -> Callable:
    """fn, marked as running inside a gradient checkpoint (in the forward and in the backward's recomputation)."""

    def run(*args):
        global _checkpointed
        _checkpointed += 1
        try:
            return fn(*args)
        finally:
            _checkpointed -= 1

    return run


def attend_normed(attn: "Attention", norm: nn.Module, x: torch.Tensor, *norm_args, kv=None) -> torch.Tensor:
    """attn(norm(x, *norm_args), kv), saving less for the backward where autograd records and x requires a gradient
    (so that the norm's backward keeps x anyway: the residual stream after the first trained block). Either

    - `attn.recompute_inputs`: the norm, the q, k, v projections and the attention run again in the backward (a
      gradient checkpoint of everything before the output projection): only x, the norm's arguments and kv are
      kept, for three more projections per attention in the backward; or
    - by default, the normed input, which the LoRA adapters of q, k and v (or trained q, k, v weights) save, is saved
      as what recomputes it (x and the norm's arguments) and recomputed when the backward reads it.

    The same ops either way, so the same values and gradients."""
    if not _records(x) or _checkpointed:
        return attn(norm(x, *norm_args), kv)
    if attn.recompute_inputs:
        heads = checkpoint(
            _in_checkpoint(lambda x, *a: attn.attend(norm(x, *a), kv)), x, *norm_args, use_reentrant=False
        )
        return attn.project(heads)
    h = norm(x, *norm_args)
    storage, version = h.untyped_storage().data_ptr(), h._version

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == storage and t._version == version:
            return (t.size(), t.stride(), t.storage_offset())  # the view autograd saved, of h recomputed
        return t

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        with torch.no_grad():
            return norm(x, *norm_args).as_strided(*saved)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return attn(h, kv)


class KeyValue(NamedTuple):
    """An attention's keys and values with the heads split: each (B, heads, L, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention. Self-attention when no keys/values are given;
    cross-attention reads the keys and values of its context from `key_value(context)`, computed once per context.
    Dropout acts on the output projection only (not on the attention probabilities), as in the reference."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(context_dim, dim, bias=bias)
        self.v = nn.Linear(context_dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.out_dropout = nn.Dropout(dropout)
        # training: recompute q, k, v (and the normed input) in the backward instead of saving them (attend_normed)
        self.recompute_inputs = False

    def key_value(self, context: torch.Tensor) -> KeyValue:
        """context (B, L, context_dim) -> keys and values (B, heads, L, D / heads) each."""
        B, L, _ = context.shape
        k = self.k(context).view(B, L, self.heads, -1).transpose(1, 2)
        v = self.v(context).view(B, L, self.heads, -1).transpose(1, 2)
        return KeyValue(k, v)

    def forward(self, x: torch.Tensor, kv: KeyValue | None = None) -> torch.Tensor:
        return self.project(self.attend(x, kv))

    def attend(self, x: torch.Tensor, kv: KeyValue | None = None) -> torch.Tensor:
        """x (B, L, D) -> the heads' attention outputs (B, heads, L, D / heads), before the output projection."""
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, L, D) -> (B, heads, L, D / heads)
        k, v = self.key_value(x) if kv is None else kv
        return attention(q, k, v)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, heads, L, D / heads) -> merged (B, L, D) -> output projection (and dropout)."""
        B, _, L, _ = y.shape
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(B, L, -1)))


class GEGLU(nn.Module):
    """Linear -> (value, gate) halves -> value * GELU(gate) (exact erf GELU) -> Linear."""

    def __init__(self, dim: int, inner: int, bias: bool, dropout: float):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * inner, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.dropout(geglu_product(self.proj_in(x))))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-v2 GRN on channels-last maps (B, H, W, C): x + gamma * (x * nx) + beta,
    nx = per-channel spatial L2 norm divided by its mean over channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


# --- the convolutional stages ------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """Depthwise 3x3 conv -> RMSNorm -> Linear(C, 4C) -> GELU -> GRN -> Linear(4C, C) -> + input,
    then modulated by the conditioning vector (after the residual add)."""

    def __init__(self, cfg: UViTConfig):
        C, bias = cfg.block_out_channels, cfg.use_bias
        super().__init__()
        self.depthwise = nn.Conv2d(C, C, kernel_size=3, padding=1, groups=C, bias=bias)
        self.norm = RMSNorm(C, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.fc1 = nn.Linear(C, 4 * C, bias=bias)
        self.grn = GlobalResponseNorm(4 * C)
        self.fc2 = nn.Linear(4 * C, C, bias=bias)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.modulation = nn.Linear(cfg.hidden_size, 2 * C, bias=bias)

    def prepare(self, c: torch.Tensor, text: torch.Tensor) -> Modulation:
        return modulation_of(self.modulation, c)

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        # x: (B, H, W, C); the conv sees a (B, C, H, W) view of it
        h = self.depthwise(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h = self.fc2(self.grn(F.gelu(self.fc1(self.norm(h)))))
        x = x + self.dropout(h)
        return modulate(x, mod.scale, mod.shift)


class TextAttentionBlock(nn.Module):
    """Two pre-norm cross-attentions from the image tokens to the (re-projected) text; no feed-forward.
    (The original code named the first one self-attention, but both attend to the text.)"""

    def __init__(self, cfg: UViTConfig):
        C, bias = cfg.block_out_channels, cfg.use_bias
        super().__init__()
        # the text arrives at hidden_size; it is mapped to the stage width when the two differ
        self.context_proj = nn.Linear(cfg.hidden_size, C, bias=bias) if cfg.hidden_size != C else None
        self.norm1 = RMSNorm(C, 1e-6)
        self.attn1 = Attention(C, cfg.block_num_heads, bias=bias, dropout=cfg.attention_dropout)
        self.norm2 = RMSNorm(C, 1e-6)
        self.attn2 = Attention(C, cfg.block_num_heads, bias=bias, dropout=cfg.attention_dropout)

    def prepare(self, c: torch.Tensor, text: torch.Tensor) -> tuple[KeyValue, KeyValue]:
        """The two attentions' keys and values of the text (B, L, hidden_size)."""
        if self.context_proj is not None:
            text = self.context_proj(F.silu(text))  # (B, L, C)
        return self.attn1.key_value(text), self.attn2.key_value(text)

    def forward(self, x: torch.Tensor, kv: tuple[KeyValue, KeyValue]) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = x + attend_normed(self.attn1, self.norm1, x, kv=kv[0])
        x = x + attend_normed(self.attn2, self.norm2, x, kv=kv[1])
        return x.view(B, H, W, C)


class Resample(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 conv (down) or transposed conv (up)."""

    def __init__(self, cfg: UViTConfig, direction: str):
        C = cfg.block_out_channels
        super().__init__()
        self.norm = RMSNorm(C, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        conv_cls = nn.Conv2d if direction == "down" else nn.ConvTranspose2d
        self.conv = conv_cls(C, C, kernel_size=2, stride=2, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) -> (B, H/2, W/2, C) or (B, 2H, 2W, C)
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# A conditioned block's call: step(block, x) -> x, with the block's conditioning found by the caller (UViT._trunk).
Step = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class ConvStage(nn.Module):
    """n x (ConvNeXtBlock, TextAttentionBlock), with an optional resampling before (down) or after (up)."""

    def __init__(self, cfg: UViTConfig, direction: str, resample: bool):
        super().__init__()
        self.direction = direction
        self.resample = Resample(cfg, direction) if resample else None
        self.res_blocks = nn.ModuleList(ConvNeXtBlock(cfg) for _ in range(cfg.num_res_blocks))
        self.attn_blocks = nn.ModuleList(TextAttentionBlock(cfg) for _ in range(cfg.num_res_blocks))

    def conditioned_blocks(self) -> list[nn.Module]:
        """The blocks that read the conditioning, in the order `forward` runs them."""
        return [b for pair in zip(self.res_blocks, self.attn_blocks) for b in pair]

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        if self.resample is not None and self.direction == "down":
            x = self.resample(x)
        for block in self.conditioned_blocks():
            x = step(block, x)
        if self.resample is not None and self.direction == "up":
            x = self.resample(x)
        return x


# --- the transformer ---------------------------------------------------------------------------------------------


class LayerConditioning(NamedTuple):
    """A transformer layer's conditioning: its three adaptive-norm modulations and the cross-attention's keys and
    values of the text."""

    attn: Modulation
    cross: Modulation
    ff: Modulation
    text: KeyValue


class TransformerLayer(nn.Module):
    """x += SelfAttn(AdaRMS(x)); x += CrossAttn(AdaRMS(x), text); x += GEGLU(AdaLayerNorm(x))."""

    def __init__(self, cfg: UViTConfig):
        D, bias, eps, affine = cfg.hidden_size, cfg.use_bias, cfg.layer_norm_eps, cfg.ln_elementwise_affine
        super().__init__()
        self.attn_norm = AdaptiveNorm(D, D, "rms", eps, affine, bias)
        self.attn = Attention(D, cfg.num_attention_heads, bias=bias, dropout=cfg.hidden_dropout)
        self.cross_norm = AdaptiveNorm(D, D, "rms", eps, affine, bias)
        self.cross_attn = Attention(D, cfg.num_attention_heads, bias=bias, dropout=cfg.hidden_dropout)
        self.ff_norm = AdaptiveNorm(D, D, "layer", eps, affine, bias)
        self.ff = GEGLU(D, cfg.intermediate_size, bias, cfg.hidden_dropout)

    def prepare(self, c: torch.Tensor, text: torch.Tensor) -> LayerConditioning:
        return LayerConditioning(
            self.attn_norm.prepare(c),
            self.cross_norm.prepare(c),
            self.ff_norm.prepare(c),
            self.cross_attn.key_value(text),
        )

    def forward(self, x: torch.Tensor, cond: LayerConditioning) -> torch.Tensor:
        x = x + attend_normed(self.attn, self.attn_norm, x, cond.attn)
        x = x + attend_normed(self.cross_attn, self.cross_norm, x, cond.cross, kv=cond.text)
        x = x + self.ff(self.ff_norm(x, cond.ff))
        return x


# --- embeddings and head ------------------------------------------------------------------------------------------


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """values (N,) -> (N, dim) = [cos(v * f_i), sin(v * f_i)], f_i = max_period^(-i / (dim/2)); computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def grid_position_embedding(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D position embedding (h, w, dim): the first half of the channels encodes the row, the second the
    column, each as sines and cosines of the position normalised to (0, 1) (token centres) at dim / 4 frequencies
    spaced geometrically from 1/2 to h/2 (w/2) cycles, so that any grid size reads the same coarse positions."""
    quarter = dim // 4

    def axis(n: int) -> torch.Tensor:  # (n, dim / 2)
        pos = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
        cycles = torch.logspace(math.log10(0.5), math.log10(max(n / 2, 0.5)), quarter, device=device)
        angles = 2 * math.pi * pos[:, None] * cycles[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    rows, cols = axis(h), axis(w)  # (h, dim/2), (w, dim/2)
    grid = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    return grid.to(dtype) if dtype is not None else grid


class CondEmbedding(nn.Module):
    """cat(pooled text (B, cond_embed_dim), sinusoids of the micro-conditions (B, n * enc)) -> MLP -> (B, D)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.encode_dim = cfg.micro_cond_encode_dim
        self.num_micro_conds = cfg.num_micro_conds
        self.fc1 = nn.Linear(cfg.cond_embed_dim + cfg.micro_cond_embed_dim, cfg.hidden_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, pooled: torch.Tensor, micro_conds: torch.Tensor) -> torch.Tensor:
        B = pooled.shape[0]
        micro = sinusoidal_embedding(micro_conds.flatten(), self.encode_dim).reshape(B, -1)
        h = torch.cat([pooled, micro], dim=1).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(h)))


class TokenEmbedding(nn.Module):
    """ids (B, h, w) -> Embedding -> RMSNorm -> Linear (a 1x1 conv) -> (B, h, w, C)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.in_channels)
        self.norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.proj = nn.Linear(cfg.in_channels, cfg.block_out_channels, bias=cfg.use_bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.embed(ids)))


class Head(nn.Module):
    """(B, h, w, C) -> Linear -> RMSNorm -> Linear -> logits (B, h, w, codebook_size)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.block_out_channels, cfg.in_channels, bias=cfg.use_bias)
        self.norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.logits = nn.Linear(cfg.in_channels, cfg.codebook_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(self.proj(x)))


# --- the model ----------------------------------------------------------------------------------------------------


class Conditioning(NamedTuple):
    """Everything the U-ViT derives from the text and micro-conditions alone (`UViT.prepare`): one entry per
    conditioned block, in the order the forward pass runs them (down stage, transformer layers, up stage).
    Valid for the model and the batch rows it was prepared with; the model's weights must not change in between."""

    blocks: tuple  # Modulation (ConvNeXt), (KeyValue, KeyValue) (text attention) or LayerConditioning (transformer)

    @property
    def batch_size(self) -> int:
        first = self.blocks[0]  # a ConvNeXt block's Modulation, or a LayerConditioning when the stages are empty
        return (first.attn if isinstance(first, LayerConditioning) else first).scale.shape[0]


def _conditioned(block: nn.Module, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Run `block` on x with its conditioning prepared from (c, text) right here (the unprepared forward pass)."""
    return block(x, block.prepare(c, text))


class UViT(nn.Module):
    def __init__(self, config: UViTConfig):
        super().__init__()
        cfg = self.config = config
        D, C, bias = cfg.hidden_size, cfg.block_out_channels, cfg.use_bias
        self.text_proj = nn.Linear(cfg.encoder_hidden_size, D, bias=bias)
        self.text_norm = RMSNorm(D, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.cond_embed = CondEmbedding(cfg)
        self.token_embed = TokenEmbedding(cfg)
        self.down = ConvStage(cfg, "down", resample=cfg.downsample)
        self.to_hidden_norm = RMSNorm(C, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.to_hidden = nn.Linear(C, D, bias=bias)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.from_hidden_norm = RMSNorm(D, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.from_hidden = nn.Linear(D, C, bias=bias)
        self.up = ConvStage(cfg, "up", resample=cfg.upsample)
        self.full_res = nn.ModuleList(ConvNeXtBlock(cfg) for _ in range(cfg.full_res_blocks))
        self.head = Head(cfg)
        self.gradient_checkpointing = False

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.head.logits.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.logits.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "UViT":
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = enabled
        return self

    def enable_attention_recompute(self, enabled: bool = True) -> "UViT":
        """In training, recompute every attention's q, k and v in the backward instead of saving them (see
        `attend_normed`): less memory for three more projections per attention, the same gradients."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.recompute_inputs = enabled
        return self

    def _run(self, fn: Callable, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(_in_checkpoint(fn), *args, use_reentrant=False)
        return fn(*args)

    def conditioned_blocks(self) -> list[nn.Module]:
        """Every block that reads the conditioning, in the order the forward pass runs them."""
        return self.down.conditioned_blocks() + list(self.layers) + self.up.conditioned_blocks() + list(self.full_res)

    def check_inputs(self, input_ids, encoder_hidden_states, pooled_text_emb, micro_conds) -> None:
        cfg = self.config
        if input_ids.dim() != 3:
            raise ValueError(f"input_ids must be a token grid (B, h, w), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        B, h, w = input_ids.shape
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, {cfg.vocab_size}) (mask id {cfg.mask_token_id}); "
                f"got values in [{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        f = cfg.grid_factor
        if h % f or w % f:
            raise ValueError(f"token grid {h}x{w} is not a multiple of {f}, which this config's down/upsampling needs")
        text_shape = tuple(encoder_hidden_states.shape)
        if len(text_shape) != 3 or text_shape[0] != B or text_shape[1] < 1 or text_shape[2] != cfg.encoder_hidden_size:
            raise ValueError(
                f"encoder_hidden_states must be (B={B}, L>=1, {cfg.encoder_hidden_size}), got {text_shape}"
            )
        if tuple(pooled_text_emb.shape) != (B, cfg.cond_embed_dim):
            raise ValueError(f"pooled_text_emb must be ({B}, {cfg.cond_embed_dim}), got {tuple(pooled_text_emb.shape)}")
        if tuple(micro_conds.shape) != (B, cfg.num_micro_conds):
            raise ValueError(f"micro_conds must be ({B}, {cfg.num_micro_conds}), got {tuple(micro_conds.shape)}")

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, h, w) long, mask id = vocab_size - 1
        encoder_hidden_states: torch.Tensor,  # (B, L, encoder_hidden_size)
        pooled_text_emb: torch.Tensor,  # (B, cond_embed_dim)
        micro_conds: torch.Tensor,  # (B, num_micro_conds)
    ) -> torch.Tensor:  # logits (B, codebook_size, h, w)
        self.check_inputs(input_ids, encoder_hidden_states, pooled_text_emb, micro_conds)
        return self.forward_channels_last(input_ids, encoder_hidden_states, pooled_text_emb, micro_conds).permute(
            0, 3, 1, 2
        )

    def forward_channels_last(self, input_ids, encoder_hidden_states, pooled_text_emb, micro_conds) -> torch.Tensor:
        """As `forward`, but logits stay (B, h, w, codebook_size): the layout the sampler and the loss read."""
        c, text = self.embed_conditions(encoder_hidden_states, pooled_text_emb, micro_conds)
        return self._trunk(input_ids, lambda block, x: self._run(_conditioned, block, x, c, text))

    def embed_conditions(
        self, encoder_hidden_states, pooled_text_emb, micro_conds
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (conditioning vector c (B, D), projected text (B, L, D)), in the model's dtype."""
        text = self.text_norm(self.text_proj(encoder_hidden_states.to(self.dtype)))  # (B, L, D)
        c = self.cond_embed(pooled_text_emb, micro_conds).to(text.dtype)  # (B, D)
        return c, text

    def prepare(self, encoder_hidden_states, pooled_text_emb, micro_conds) -> Conditioning:
        """The conditioning of every block for these text rows (shapes as in `forward`), to pass to
        `forward_prepared` at every decoding step: the text projection, c, the adaptive-norm modulations and the
        keys and values of all cross-attentions, computed once."""
        c, text = self.embed_conditions(encoder_hidden_states, pooled_text_emb, micro_conds)
        return Conditioning(tuple(block.prepare(c, text) for block in self.conditioned_blocks()))

    def forward_prepared(self, input_ids: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """input_ids (B, h, w) with conditioning from `prepare` (B rows) -> logits (B, h, w, codebook_size); the
        same as `forward_channels_last` on the inputs it was prepared from."""
        blocks = self.conditioned_blocks()
        if len(cond.blocks) != len(blocks) or cond.batch_size != input_ids.shape[0]:
            raise ValueError(
                f"conditioning for {len(cond.blocks)} blocks and {cond.batch_size} rows does not fit this model "
                f"({len(blocks)} blocks) and input_ids of batch {input_ids.shape[0]}"
            )
        conds = iter(cond.blocks)  # _trunk runs the blocks in the order of conditioned_blocks()
        return self._trunk(input_ids, lambda block, x: self._run(block, x, next(conds)))

    def _trunk(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """The network from token ids to logits; `step(block, x)` runs each conditioned block."""
        x = embedded = self.token_embed(input_ids)  # (B, h, w, C)
        if self.config.position_embedding:
            x = embedded = x + grid_position_embedding(*x.shape[1:], device=x.device, dtype=x.dtype)
        x = self.down(x, step)  # (B, h', w', C)
        B, H, W, C = x.shape
        x = self.to_hidden(self.to_hidden_norm(x.reshape(B, H * W, C)))  # (B, h'w', D)
        if self.config.position_embedding:
            x = x + grid_position_embedding(H, W, x.shape[-1], device=x.device, dtype=x.dtype).view(1, H * W, -1)
        for layer in self.layers:
            x = step(layer, x)
        x = self.from_hidden(self.from_hidden_norm(x)).view(B, H, W, C)  # (B, h', w', C)
        x = self.up(x, step)  # (B, h, w, C)
        if self.full_res:
            x = x + embedded  # the long skip: each token's own code, at the token grid
            for block in self.full_res:
                x = step(block, x)
        return self.head(x)  # (B, h, w, codebook_size)
