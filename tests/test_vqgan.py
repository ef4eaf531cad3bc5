"""The VQ-GAN computes what diffusers' `VQModel` computes, on the same (randomised) weights, and decodes in half
precision where the reference overflows.

Tolerances (CPU, fp32): token ids exactly equal; decoded pixels within 1e-5 (our decoder runs the reference's
operations in the reference's memory layout, so in practice the pixels are bit-equal; 1e-5 allows for a kernel
choice that reassociates a sum).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from convert import vqgan_from_diffusers
from convert.diffusers_keys import VQGAN_KEYMAP
from convert.mapping import tensors_to_theirs
from tests.helpers import assert_same_gradients, randomize_
from vqgan import VQGAN, VQGANConfig

PIXEL_TOL = 1e-5
FP16_MAX = torch.finfo(torch.float16).max  # 65504

KINDS = ["tiny-256", pytest.param("full-256", marks=pytest.mark.full)]


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with structure at several scales (upsampled coarse noise plus fine noise), so that the
    encoder sees something more like a picture than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(1, height // 8), max(1, width // 8), generator=g)
    x = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.8 * x + 0.2 * torch.rand(batch, 3, height, width, generator=g)).clamp(0, 1)


def image_size(vq: VQGAN) -> tuple[int, int]:
    """A non-square image of 4 x 6 tokens: 64 x 96 pixels for the published factor 16."""
    f = vq.downsample_factor
    return 4 * f, 6 * f


def reference_ids(ref, pixels: torch.Tensor) -> torch.Tensor:
    """diffusers' encode -> quantize indices, as a (B, h, w) grid."""
    latents = ref.encode(pixels).latents
    _, _, (_, _, indices) = ref.quantize(latents)
    return indices.view(latents.shape[0], *latents.shape[2:])


def reference_decode(ref, ids: torch.Tensor) -> torch.Tensor:
    """diffusers' codebook lookup + decode of a (B, h, w) id grid (the pipelines' path)."""
    shape = (*ids.shape, ref.quantize.vq_embed_dim)
    return ref.decode(ids.flatten(), force_not_quantize=True, shape=shape).sample


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=KINDS)
def pair(request, reference_pipelines):
    """(reference VQModel of the session pipeline, our VQGAN converted from it). The reference is never modified."""
    ref = reference_pipelines(request.param).vqvae
    return ref, vqgan_from_diffusers(dict(ref.config), ref.state_dict())


def test_encoded_ids_match_reference(pair):
    ref, ours = pair
    pixels = smooth_images(2, *image_size(ours))
    with torch.no_grad():
        expected = reference_ids(ref, pixels)
        got = ours.encode(pixels)
    assert got.dtype == torch.long and got.shape == expected.shape == (2, 4, 6)
    assert expected.unique().numel() > 4, "the images should use several codes, or equality proves little"
    assert torch.equal(got, expected)


def test_decoded_pixels_match_reference(pair):
    ref, ours = pair
    ids = torch.randint(0, ours.quantizer.num_codes, (2, 4, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_decode(ref, ids)
        got = ours.decode(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (2, 3, *image_size(ours))
    assert (got - expected).abs().max() <= PIXEL_TOL


@pytest.mark.slow
def test_training_forward_matches_reference(reference_pipelines):
    """The continuous path training uses: latents -> straight-through quantisation -> reconstruction, its
    codebook/commitment loss (the reference's weighting), and the gradients of reconstruction + VQ loss with respect
    to every weight (codebook included), per tensor within 1e-4 of its largest reference gradient."""
    ref = reference_pipelines("tiny-256").vqvae
    ours = vqgan_from_diffusers(dict(ref.config), ref.state_dict())
    pixels = smooth_images(2, *image_size(ours), seed=2)

    def reference_forward():  # diffusers: encode -> quantize (straight-through) -> decode, and the VQ loss
        return ref(pixels, return_dict=False)

    def our_forward():
        recon, quantized = ours(pixels)
        return recon, quantized.loss

    def run(model, forward):
        params = dict(model.named_parameters())
        recon, vq_loss = forward()
        loss = F.mse_loss(recon, pixels) + vq_loss
        return recon.detach(), vq_loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    ref_recon, ref_loss, ref_grads = run(ref, reference_forward)
    recon, loss, grads = run(ours, our_forward)
    grads = tensors_to_theirs(grads, VQGAN_KEYMAP)  # our names -> diffusers' names

    assert (recon - ref_recon).abs().max() <= PIXEL_TOL
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    assert all(g.abs().max() > 0 for g in ref_grads.values()), "a weight without gradient proves nothing"
    failing = {n: e for n in grads if not (e := relative_error(grads[n], ref_grads[n])) <= 1e-4}
    assert not failing, f"{len(failing)} gradient(s) differ: {sorted(failing.items(), key=lambda kv: -kv[1])[:5]}"


def test_quantizer_is_straight_through(reference_pipelines):
    """Forward value = the nearest codes (up to the rounding of z + (codes - z)); gradient to the latents = the
    incoming gradient, unchanged."""
    ref = reference_pipelines("tiny-256").vqvae
    quantizer = vqgan_from_diffusers(dict(ref.config), ref.state_dict()).quantizer
    z = torch.randn(
        2, quantizer.codebook.embedding_dim, 3, 5, generator=torch.Generator().manual_seed(3), requires_grad=True
    )
    out = quantizer(z)
    upstream = torch.randn(out.quantized.shape, generator=torch.Generator().manual_seed(4))
    (grad_z,) = torch.autograd.grad((out.quantized * upstream).sum(), z)
    torch.testing.assert_close(out.quantized.detach(), quantizer.lookup(out.ids), rtol=0, atol=1e-6)
    assert torch.equal(grad_z, upstream)


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def _training_gradients(model: VQGAN, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    recon, q = model(pixels)
    loss = F.mse_loss(recon, pixels) + q.loss
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.slow
def test_gradient_checkpointing_gives_equal_gradients(reference_pipelines):
    ref = reference_pipelines("tiny-256").vqvae
    model = vqgan_from_diffusers(dict(ref.config), ref.state_dict()).train()
    pixels = smooth_images(2, *image_size(model))
    plain = _training_gradients(model, pixels)
    checkpointed = _training_gradients(model.enable_gradient_checkpointing(), pixels)
    assert_same_gradients(plain, checkpointed)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_blocks(reference_pipelines):
    """Each checkpointed encoder/decoder block runs its forward again during the backward pass."""
    ref = reference_pipelines("tiny-256").vqvae
    model = vqgan_from_diffusers(dict(ref.config), ref.state_dict()).train()
    pixels = smooth_images(1, *image_size(model))
    blocks = [model.encoder.levels[0], model.encoder.mid[1], model.decoder.mid[0], model.decoder.levels[-1]]
    calls = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: calls.append(module))

    def forward_calls_per_block(enabled: bool) -> set[int]:
        calls.clear()
        _training_gradients(model.enable_gradient_checkpointing(enabled), pixels)
        return {sum(c is b for c in calls) for b in blocks}

    assert forward_calls_per_block(False) == {1}
    assert forward_calls_per_block(True) == {2}


# --- half precision -------------------------------------------------------------------------------------------------

# Unit roundoff: fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3. Our half-precision decoder rounds each conv's output
# (about 2 per ResNet block) but keeps the residual stream and every group norm's statistics in fp32, so errors do
# not compound through the stream; measured errors relative to max|pixels| are about 2-3 unit roundoffs (1.1e-3 fp16,
# 1.0e-2 bf16 at the tiny size). The bound is 10 unit roundoffs: 4.9e-3 and 3.9e-2.
HALF_TOL = {torch.float16: 10 * 2.0**-11, torch.bfloat16: 10 * 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_decode_close_to_fp32(pair, dtype):
    """At the published size a single token (16 x 16 pixels): fp16 convolutions on the CPU are very slow (a 64 x 96
    decode takes minutes), and the network's depth, which sets the error, does not depend on the image size."""
    ref, fp32 = pair
    half = vqgan_from_diffusers(dict(ref.config), ref.state_dict(), dtype=dtype)
    grid = (1, 1) if fp32.downsample_factor >= 16 else (2, 3)
    ids = torch.randint(0, fp32.quantizer.num_codes, (1, *grid), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = fp32.decode(ids)
        got = half.decode(ids)
    assert half.dtype == dtype and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert relative_error(got, expected) <= HALF_TOL[dtype]


@torch.no_grad()
def scale_decoder_stream_(vq, s: float):
    """Multiply the reference decoder's residual stream by `s` without changing what it computes: conv_in and every
    ResNet block's second conv (the residual branch) are scaled by s, and the biases of the convs that read the stream
    linearly (shortcuts, upsampling) by s too. Every group norm divides the scale out again, so in exact arithmetic the
    decoded pixels are unchanged. A decoder whose activations grow large, as a trained one's do, in one knob."""
    dec = vq.decoder
    dec.conv_in.weight.mul_(s), dec.conv_in.bias.mul_(s)
    for block in [dec.mid_block, *dec.up_blocks]:
        for resnet in block.resnets:
            resnet.conv2.weight.mul_(s), resnet.conv2.bias.mul_(s)
            if resnet.conv_shortcut is not None:
                resnet.conv_shortcut.bias.mul_(s)
        for upsampler in getattr(block, "upsamplers", None) or []:
            upsampler.conv.bias.mul_(s)
    return vq


@pytest.mark.slow
def test_fp16_decode_stays_finite_where_reference_overflows():
    """Where the reference overflows in fp16, and that ours does not.

    A tiny VQ-GAN (3 ResNet blocks per decoder level) with its decoder stream scaled by s = 12288 (see
    `scale_decoder_stream_`): the outputs of conv_in and of every residual branch stay below 45,000, but the residual
    stream, which grows through the decoder by about 2.8x here (it is the sum of every block's output), passes the
    fp16 maximum of 65,504.
    In the reference's fp16 decode the first non-finite value is the output of a ResNet block whose input and whose
    residual branch (conv2) are both finite: the residual sum `input + conv2(...)` overflows to inf, and the group
    norm that reads it next turns inf into NaN, which spreads to every pixel. (Half-precision group norm itself does
    not overflow here: the CPU kernel accumulates its statistics in fp32.)
    Ours keeps the stream and the group-norm statistics in fp32, runs the convs in fp16, and feeds the convs that
    read the stream (shortcuts, upsampling) a power-of-two-scaled copy of it: the decode is finite and within the
    fp16 tolerance of our fp32 decode of the same weights, which in turn equals the reference's fp32 decode.
    """
    cfg = VQGANConfig.tiny(layers_per_block=2)
    from diffusers import VQModel

    ref = scale_decoder_stream_(randomize_(VQModel(**cfg.to_diffusers_dict()), seed=1).eval(), 12288.0)
    ours32 = vqgan_from_diffusers(dict(ref.config), ref.state_dict())
    ours16 = vqgan_from_diffusers(dict(ref.config), ref.state_dict(), dtype=torch.float16)
    ref16 = copy.deepcopy(ref).to(torch.float16)
    ids = torch.randint(0, cfg.num_vq_embeddings, (2, 4, 4), generator=torch.Generator().manual_seed(6))

    # record, in call order, whether each reference module's inputs and output were finite
    trace = []

    def record(name):
        def hook(module, args, out):
            finite_in = all(torch.isfinite(a).all().item() for a in args if isinstance(a, torch.Tensor))
            trace.append((name, type(module).__name__, finite_in, torch.isfinite(out).all().item()))

        return hook

    for name, module in ref16.decoder.named_modules():
        if name:
            module.register_forward_hook(record(name))

    with torch.no_grad():
        expected = reference_decode(ref, ids)
        ref_half = reference_decode(ref16, ids)
        fp32 = ours32.decode(ids)
        got = ours16.decode(ids)

    assert (fp32 - expected).abs().max() <= PIXEL_TOL  # in fp32 ours and the reference agree at these weights
    assert not torch.isfinite(ref_half).any(), "the reference's fp16 decode should overflow at these weights"
    first = next(t for t in trace if not t[3])
    name, kind, finite_in, _ = first
    assert kind == "ResnetBlock2D" and finite_in, f"expected the residual sum to overflow first, got {first}"
    conv2 = next(t for t in trace if t[0] == f"{name}.conv2")
    assert conv2[3], f"the residual branch overflowed by itself, not only the sum: {conv2}"
    assert torch.isfinite(got).all()
    assert relative_error(got, fp32) <= HALF_TOL[torch.float16]


# --- bad input ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> VQGAN:
    return randomize_(VQGAN(VQGANConfig.tiny())).eval()


@pytest.mark.parametrize("size", [(30, 32), (32, 18)])
def test_image_side_not_multiple_of_factor_raises(tiny, size):
    h, w = size
    with pytest.raises(
        ValueError, match=rf"image size {h}x{w} is not a multiple of the VQ-GAN's downsampling factor 4"
    ):
        tiny.encode(torch.rand(1, 3, h, w))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32)])
def test_pixels_of_wrong_layout_raise(tiny, shape):
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, H, W\)"):
        tiny.encode(torch.rand(shape))


def test_integer_pixels_raise(tiny):
    with pytest.raises(ValueError, match=r"pixels must be float in \[0, 1\], got dtype torch.uint8"):
        tiny.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [64, -1, 71], ids=["codebook-size", "negative", "mask-id"])
def test_decode_ids_out_of_range_raise(tiny, bad):
    ids = torch.zeros(1, 2, 2, dtype=torch.long)
    ids[0, 1, 1] = bad
    with pytest.raises(ValueError, match=rf"ids must lie in \[0, 64\); got values in \[{min(bad, 0)}, {max(bad, 0)}\]"):
        tiny.decode(ids)


@pytest.mark.parametrize("ids", [torch.zeros(4, dtype=torch.long), torch.zeros(1, 2, 2)], ids=["flat", "float"])
def test_decode_ids_of_wrong_form_raise(tiny, ids):
    with pytest.raises(ValueError, match=r"ids must be an integer grid \(B, h, w\)"):
        tiny.decode(ids)


# --- size ---------------------------------------------------------------------------------------------------------------


def test_parameter_count_is_published():
    """Built on the meta device, ours and diffusers' VQ-GAN of the published config both have 146,244,675 parameters."""
    from diffusers import VQModel

    cfg = VQGANConfig.amused()
    with torch.device("meta"):
        ours = VQGAN(cfg)
        ref = VQModel(**cfg.to_diffusers_dict())
    assert sum(p.numel() for p in ours.parameters()) == 146_244_675
    assert sum(p.numel() for p in ref.parameters()) == 146_244_675


def test_an_encoder_without_resnet_blocks_runs_at_equal_widths():
    """layers_per_block 0: the encoder is convolutions and resampling only; the decoder keeps one block per level."""
    cfg = VQGANConfig(
        block_out_channels=(8, 8, 8, 8), layers_per_block=0, latent_channels=4, num_vq_embeddings=16, norm_num_groups=4
    )
    model = VQGAN(cfg)
    ids = model.encode(torch.rand(2, 3, 64, 64))
    assert ids.shape == (2, 8, 8)  # factor 8: three downsamplings
    assert model.decode(ids).shape == (2, 3, 64, 64)


def test_an_encoder_without_resnet_blocks_refuses_changing_widths():
    with pytest.raises(ValueError, match=r"layers_per_block 0 needs equal block_out_channels .*\[8, 16\]"):
        VQGANConfig(block_out_channels=(8, 16), layers_per_block=0, latent_channels=4, norm_num_groups=4)
