"""The U-ViT's save-less autograd (uvit.model: the GEGLU product and the CPU flash attention, each recomputing one
tensor in the backward instead of saving it): the same loss and gradients as plain autograd, bit for bit, for full
fine-tuning, LoRA and gradient checkpointing, with fewer bytes saved for the backward."""

from __future__ import annotations

import shutil

import pytest
import torch

import uvit.model as model_module
from convert.lora import module_namer
from train import cpu_cache
from train.masking import masked_cross_entropy
from uvit import UViT, UViTConfig
from uvit.lora import inject_lora

# the tiny layout, wider (heads of 32; the published models' are 64), at a batch whose activations are all 64 KiB or
# more (what the caching allocator counts): 4 x 64 positions x 128 floats
CONFIG = dict(hidden_size=128, block_out_channels=128, intermediate_size=256, num_attention_heads=4, block_num_heads=4)
BATCH = 4
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler: the allocator cannot build"
)


def inputs(cfg: UViTConfig, batch: int = BATCH, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.sample_size
    ids = torch.randint(0, cfg.codebook_size, (batch, n, n), generator=g)
    masked = torch.rand(batch, n, n, generator=g) < 0.6
    text = torch.randn(batch, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(batch, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([[256.0, 256, 0, 0, 6]]).expand(batch, -1)
    return ids.masked_fill(masked, cfg.mask_token_id), ids.masked_fill(~masked, -100), text, pooled, micro


def step(model: UViT, save_less: bool, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, gradients by name, bytes the forward leaves held for the backward: the caching allocator's count of
    bytes requested in use after the forward less before it, which sees every tensor of 64 KiB or more)."""
    monkeypatch.setattr(model_module, "SAVE_LESS", save_less)
    model.zero_grad(set_to_none=True)
    ids, labels, text, pooled, micro = inputs(model.config)
    with cpu_cache.caching():
        before = cpu_cache.stats().requested
        loss = masked_cross_entropy(model(ids, text, pooled, micro).permute(0, 2, 3, 1), labels)
        held = cpu_cache.stats().requested - before
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, held


@needs_compiler
@pytest.mark.parametrize("recipe", ["full", "lora", "lora-checkpointed"])
def test_save_less_autograd_gives_plain_autograd_gradients_bit_for_bit(recipe, monkeypatch):
    torch.manual_seed(0)
    model = UViT(UViTConfig.tiny(**CONFIG)).train()
    if recipe.startswith("lora"):
        inject_lora(model, ["to_q", "to_k", "to_v"], 4, 8, namer=module_namer(model))
        torch.manual_seed(1)
        for p in model.parameters():  # B starts at zero, which would make A's gradient zero: give both values
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
    model.enable_gradient_checkpointing(recipe.endswith("checkpointed"))

    calls = {"attention": 0, "geglu": 0}
    for name, fn in (("attention", model_module._CPUFlashAttention), ("geglu", model_module._GEGLUProduct)):
        original = fn.backward

        def counted(ctx, grad, _original=original, _name=name):
            calls[_name] += 1
            return _original(ctx, grad)

        monkeypatch.setattr(fn, "backward", staticmethod(counted))

    plain_loss, plain_grads, plain_saved = step(model, False, monkeypatch)
    assert calls == {"attention": 0, "geglu": 0}
    loss, grads, saved = step(model, True, monkeypatch)
    cfg = model.config
    attentions = cfg.num_hidden_layers * 2 + 2 * cfg.num_res_blocks * 2  # transformer layers: 2; text blocks: 2 each
    assert calls == {"attention": attentions, "geglu": cfg.num_hidden_layers}  # the save-less path ran, every one

    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    different = [n for n in grads if not torch.equal(grads[n], plain_grads[n])]
    assert not different, different
    if recipe == "lora-checkpointed":  # only the checkpoints' inputs are held either way
        assert saved == plain_saved
    else:
        # held no more: per transformer layer GELU(gate) (inner floats per position), and per attention (two per
        # layer and per text block) its normed input and, with LoRA (no trained output projection to save its
        # input, which may share the output's storage), its output
        per_attention = 2 if recipe == "lora" else 1
        widths = cfg.num_hidden_layers * (cfg.intermediate_size + 2 * per_attention * cfg.hidden_size)
        widths += 2 * cfg.num_res_blocks * 2 * per_attention * cfg.block_out_channels
        if recipe == "lora":  # but the first attention's input, normed from frozen blocks' output, is held either way
            widths -= cfg.block_out_channels
        expected = BATCH * cfg.sample_size**2 * 4 * widths  # fp32
        if recipe == "lora":
            assert plain_saved - saved == expected
        else:
            assert plain_saved - saved >= expected


def test_inference_is_untouched_by_save_less_autograd(monkeypatch):
    torch.manual_seed(0)
    model = UViT(UViTConfig.tiny(**CONFIG)).eval()
    ids, _, text, pooled, micro = inputs(model.config)
    outs = []
    for save_less in (False, True):
        monkeypatch.setattr(model_module, "SAVE_LESS", save_less)
        with torch.no_grad():
            outs.append(model(ids, text, pooled, micro))
        outs.append(model(ids, text, pooled, micro))  # with autograd recording: the save-less forward
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@needs_compiler
def test_recomputing_the_attention_inputs_gives_the_same_gradients_and_holds_no_q_k_v(monkeypatch):
    """UViT.enable_attention_recompute (what LoRA training turns on): the norm, q, k, v and the attention run again
    in the backward; the gradients stay plain autograd's, bit for bit, and no attention's queries (nor a
    self-attention's keys and values) are held."""
    torch.manual_seed(0)
    model = UViT(UViTConfig.tiny(**CONFIG)).train()
    inject_lora(model, ["to_q", "to_k", "to_v"], 4, 8, namer=module_namer(model))
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    plain_loss, plain_grads, _ = step(model, False, monkeypatch)
    _, _, save_less = step(model, True, monkeypatch)
    loss, grads, recomputing = step(model.enable_attention_recompute(), True, monkeypatch)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    different = [n for n in grads if not torch.equal(grads[n], plain_grads[n])]
    assert not different, different
    cfg = model.config
    # per transformer layer the self-attention's q, k, v and the cross-attention's q; per text-block attention its
    # q, but the first one's (its input is the frozen blocks' output: nothing saves it there)
    widths = cfg.num_hidden_layers * 4 * cfg.hidden_size + (2 * cfg.num_res_blocks * 2 - 1) * cfg.block_out_channels
    assert save_less - recomputing == BATCH * cfg.sample_size**2 * 4 * widths


def test_bf16_autocast_trains_the_cpu_attention_in_fp32():
    """Under CPU autocast the projections run in bf16 but the attention itself in fp32 (its bf16 backward kernel is
    several times slower on the CPU, docs/training.md): every flash-attention op, forward and backward, sees fp32
    inputs, and the gradients stay those of fp32 training within bf16's rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    flash = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    }

    class AttentionDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in flash:
                self.seen.append((func.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = UViT(UViTConfig.tiny(**CONFIG)).train()
    ids, labels, text, pooled, micro = inputs(model.config)

    def grads(bf16: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, text, pooled, micro)
        masked_cross_entropy(logits.float().permute(0, 2, 3, 1), labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads(bf16=False)
    with AttentionDtypes() as mode:
        mixed = grads(bf16=True)
    names = {name for name, _ in mode.seen}
    assert len(names) == 2 and len(mode.seen) >= 2 * len(model.layers)  # forward and backward, every layer
    assert all(dtype == torch.float32 for _, dtype in mode.seen), mode.seen
    assert reference.keys() == mixed.keys()
    for name, g in reference.items():
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per product input); through a few layers that is a
        # few percent of a gradient's scale
        err = (mixed[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 0.1, (name, err.item())
