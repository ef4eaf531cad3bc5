"""The U-ViT computes what diffusers' `UVit2DModel` computes, on the same (randomised) weights.

Every parameter of the reference is randomised to a non-trivial value (`tests.helpers.randomize_`: norm weights
1 + N(0, 0.1), the zero-initialised GRN gamma/beta and modulation weights random too), our model is converted from
its state dict, and both run the same inputs on the CPU in fp32.

Tolerance: logits and weight gradients within 1e-4 x their largest magnitude (per tensor for gradients). Both
implementations do the same fp32 arithmetic in a different association order (fused vs separate reshapes, SDPA
kernels chosen by layout), so they may differ by a few ulps per op, about 1e-6 relative after 22 layers; 1e-4 leaves
room for that and still catches any real difference (a wrong norm, a swapped half, a missing modulation all give
errors of order 1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from convert import uvit_from_diffusers
from convert.diffusers_keys import UVIT_KEYMAP
from convert.mapping import tensors_to_theirs
from tests.helpers import assert_same_gradients, randomize_, uvit_config
from uvit import UViT, UViTConfig

REL_TOL = 1e-4

KINDS = [
    "tiny-256",
    "tiny-512",
    pytest.param("full-256", marks=pytest.mark.full),
    pytest.param("full-512", marks=pytest.mark.full),
]


def uvit_inputs(cfg: UViTConfig, batch: int, grid: tuple[int, int], text_len: int, seed: int = 0):
    """Random model inputs: ids with about half the grid masked (as mid-sampling), text states, pooled embedding,
    and micro-conditions of the published kind (sizes in pixels, crop offsets, an aesthetic score)."""
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.codebook_size, (batch, h, w), generator=g)
    ids[torch.rand(batch, h, w, generator=g) < 0.5] = cfg.mask_token_id
    text = torch.randn(batch, text_len, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(batch, cfg.cond_embed_dim, generator=g)
    micro = torch.cat(
        [
            torch.randint(256, 1025, (batch, 2), generator=g),
            torch.randint(0, 64, (batch, 2), generator=g),
            torch.randint(4, 8, (batch, 1), generator=g),
        ],
        dim=1,
    ).float()
    return ids, text, pooled, micro


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def cases(cfg: UViTConfig, full: bool):
    """(batch, grid, text length) per case: the published grid with 77 text positions, and a non-square grid with
    5. Batch 1 at full size keeps the CPU time down; the tiny models take batch 2 (per-sample conditioning)."""
    f, batch = cfg.grid_factor, 1 if full else 2
    return {
        "published grid, L=77": (batch, (cfg.sample_size, cfg.sample_size), 77),
        "non-square grid, L=5": (batch, (3 * f, 4 * f), 5),
    }


@pytest.fixture(scope="module", params=KINDS)
def pair(request, reference_pipelines):
    """(kind, reference UVit2DModel, our UViT converted from its state dict). The reference is the session's (shared
    with other modules, never modified here)."""
    ref = reference_pipelines(request.param).transformer
    return request.param, ref, uvit_from_diffusers(dict(ref.config), ref.state_dict())


@pytest.mark.parametrize("case", ["published grid, L=77", "non-square grid, L=5"])
def test_logits_match_reference(pair, case):
    kind, ref, ours = pair
    batch, grid, text_len = cases(ours.config, kind.startswith("full"))[case]
    inputs = uvit_inputs(ours.config, batch, grid, text_len)
    with torch.no_grad():
        expected = ref(*inputs)
        got = ours(*inputs)
    assert got.shape == expected.shape == (batch, ours.config.codebook_size, *grid)
    assert relative_error(got, expected) <= REL_TOL


@pytest.mark.slow
def test_weight_gradients_match_reference(pair):
    """d(cross-entropy)/d(every weight), ours mapped to diffusers' names and layouts, per tensor within 1e-4 of
    the tensor's largest reference gradient. Non-square grid and a 5-token text, to keep the full-size run short."""
    kind, ref, ours = pair
    batch, grid, text_len = cases(ours.config, kind.startswith("full"))["non-square grid, L=5"]
    inputs = uvit_inputs(ours.config, batch, grid, text_len, seed=1)
    targets = torch.randint(0, ours.config.codebook_size, (batch, *grid), generator=torch.Generator().manual_seed(2))

    def gradients(model):
        params = dict(model.named_parameters())
        loss = F.cross_entropy(model(*inputs), targets)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    expected = gradients(ref)
    got = tensors_to_theirs(gradients(ours), UVIT_KEYMAP)
    assert got.keys() == expected.keys()
    worst = {name: relative_error(got[name], expected[name]) for name in expected}
    assert all(expected[name].abs().max() > 0 for name in expected), "a weight without gradient proves nothing"
    failing = {name: err for name, err in worst.items() if not err <= REL_TOL}
    assert not failing, f"{len(failing)} gradient(s) differ: {sorted(failing.items(), key=lambda kv: -kv[1])[:5]}"


@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
@pytest.mark.parametrize("grid,text_len", [((2, 8), 77), ((10, 4), 5), ((6, 6), 1), ((4, 2), 120)])
def test_grids_and_text_lengths_match_reference(reference_pipelines, kind, grid, text_len):
    """Token grids other than the default (tall, wide, small) and any text length, including 1 and more than 77."""
    ref = reference_pipelines(kind).transformer
    ours = uvit_from_diffusers(dict(ref.config), ref.state_dict())
    inputs = uvit_inputs(ours.config, 2, grid, text_len, seed=3)
    with torch.no_grad():
        assert relative_error(ours(*inputs), ref(*inputs)) <= REL_TOL


def test_odd_grid_matches_reference_without_resampling(reference_pipelines):
    """Without the 512 layout's down/upsampling any grid side works, odd ones included."""
    ref = reference_pipelines("tiny-256").transformer
    ours = uvit_from_diffusers(dict(ref.config), ref.state_dict())
    inputs = uvit_inputs(ours.config, 2, (5, 7), 9, seed=4)
    with torch.no_grad():
        assert relative_error(ours(*inputs), ref(*inputs)) <= REL_TOL


def test_channels_last_forward_is_forward_transposed(reference_pipelines):
    ref = reference_pipelines("tiny-512").transformer
    ours = uvit_from_diffusers(dict(ref.config), ref.state_dict())
    inputs = uvit_inputs(ours.config, 2, (4, 6), 7)
    with torch.no_grad():
        assert torch.equal(ours.forward_channels_last(*inputs).permute(0, 3, 1, 2), ours(*inputs))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_prepared_conditioning_gives_the_same_logits(reference_pipelines, kind):
    """The decoding loop prepares the text-only part of the network once (modulations, cross-attention keys and
    values) and calls `forward_prepared` at every step: the same operations on the same tensors, so the logits are
    bit-equal to the unprepared forward's, and reusing one conditioning for new token grids stays equal."""
    ref = reference_pipelines(kind).transformer
    ours = uvit_from_diffusers(dict(ref.config), ref.state_dict())
    ids, text, pooled, micro = uvit_inputs(ours.config, 2, (4, 6), 7)
    with torch.no_grad():
        cond = ours.prepare(text, pooled, micro)
        assert torch.equal(ours.forward_prepared(ids, cond), ours.forward_channels_last(ids, text, pooled, micro))
        other_ids = uvit_inputs(ours.config, 2, (4, 6), 7, seed=1)[0]
        assert torch.equal(
            ours.forward_prepared(other_ids, cond), ours.forward_channels_last(other_ids, text, pooled, micro)
        )


def test_prepared_conditioning_for_other_rows_raises(tiny_512):
    ids, text, pooled, micro = uvit_inputs(tiny_512.config, 2, (4, 4), 3)
    with torch.no_grad():
        cond = tiny_512.prepare(text, pooled, micro)
        with pytest.raises(ValueError, match="2 rows"):
            tiny_512.forward_prepared(ids[:1], cond)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_dropout_matches_reference_in_training_mode(kind):
    """With dropout on and the same seed, training-mode logits are equal: our dropouts sit where the reference's do
    (after each attention's output projection, between GEGLU and its output projection, after the ConvNeXt MLP),
    and draw their masks in the same order."""
    from diffusers import UVit2DModel

    cfg = uvit_config(kind)
    cfg.hidden_dropout, cfg.attention_dropout = 0.2, 0.3
    ref = randomize_(UVit2DModel(**cfg.to_diffusers_dict())).train()
    ours = uvit_from_diffusers(dict(ref.config), ref.state_dict()).train()
    inputs = uvit_inputs(cfg, 2, (4, 6), 5)
    torch.manual_seed(7)
    expected = ref(*inputs)
    torch.manual_seed(7)
    got = ours(*inputs)
    torch.manual_seed(8)
    other_masks = ours(*inputs)
    assert relative_error(other_masks, expected) > 1e-2, "dropout had no effect: the test would prove nothing"
    assert relative_error(got, expected) <= REL_TOL


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def _loss_gradients(model: UViT, inputs) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    logits = model(*inputs)
    loss = F.cross_entropy(logits, torch.zeros(logits.shape[:1] + logits.shape[2:], dtype=torch.long))
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_gradient_checkpointing_gives_equal_gradients(reference_pipelines, kind):
    """Recomputing each block in the backward pass gives the very gradients of the plain backward pass."""
    ref = reference_pipelines(kind).transformer
    model = uvit_from_diffusers(dict(ref.config), ref.state_dict()).train()
    inputs = uvit_inputs(model.config, 2, (4, 6), 5)
    plain = _loss_gradients(model, inputs)
    checkpointed = _loss_gradients(model.enable_gradient_checkpointing(), inputs)
    assert_same_gradients(plain, checkpointed)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_blocks(reference_pipelines):
    """The switch really checkpoints: each block's forward runs again during the backward pass (twice in all),
    and once without it. (The reference's switch was first a silent no-op, then a crash.)"""
    ref = reference_pipelines("tiny-512").transformer
    model = uvit_from_diffusers(dict(ref.config), ref.state_dict()).train()
    inputs = uvit_inputs(model.config, 1, (4, 4), 3)
    blocks = [model.layers[0], model.down.res_blocks[0], model.up.attn_blocks[0]]
    calls = []
    for block in blocks:
        # a pre-hook: the recomputation may stop early, once it has what the backward pass needs
        block.register_forward_pre_hook(lambda module, args: calls.append(module))

    def forward_calls_per_block(enabled: bool) -> set[int]:
        calls.clear()
        model.enable_gradient_checkpointing(enabled)
        model(*inputs).sum().backward()
        return {sum(c is b for c in calls) for b in blocks}

    assert forward_calls_per_block(False) == {1}
    assert forward_calls_per_block(True) == {2}


def test_reference_gradient_checkpointing_does_not_work(reference_pipelines):
    """Informative, about the reference: its gradient checkpointing is unusable, which is why
    ours is tested above. diffusers 0.42 raises a TypeError on any forward with grad; older versions ran without
    checkpointing anything. Either way a block's forward runs only once, or not at all. This fails only if the
    reference's checkpointing starts working (then README's list of its defects needs updating). Runs on a fresh model of the same config."""
    from diffusers import UVit2DModel

    ref = reference_pipelines("tiny-256").transformer
    model = UVit2DModel.from_config(ref.config).train()
    model.enable_gradient_checkpointing()
    calls = []
    model.transformer_layers[0].register_forward_pre_hook(lambda module, args: calls.append(module))
    try:
        model(*uvit_inputs(UViTConfig.from_dict(dict(ref.config)), 1, (4, 4), 3)).sum().backward()
    except TypeError:
        assert len(calls) <= 1
    else:
        assert len(calls) == 1, "the reference's gradient checkpointing recomputed a block: it works now"


# --- half precision -------------------------------------------------------------------------------------------------

# Unit roundoff: fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3. Every norm computes its statistics in fp32, so rounding
# errors do not compound through the normalisations; measured errors relative to max|logits| are 2.1e-3 to 2.3e-3
# (fp16, about 4.5 unit roundoffs) and 2.0e-2 to 2.2e-2 (bf16) on these random weights. The bound is 20 unit
# roundoffs, about 1e-2 and 8e-2: four times the measured error, and far below the error of order 1 a real fault gives.
HALF_TOL = {torch.float16: 20 * 2.0**-11, torch.bfloat16: 20 * 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["tiny-256", "tiny-512"])
def test_half_precision_forward_close_to_fp32(reference_pipelines, kind, dtype):
    ref = reference_pipelines(kind).transformer
    fp32 = uvit_from_diffusers(dict(ref.config), ref.state_dict())
    half = uvit_from_diffusers(dict(ref.config), ref.state_dict(), dtype=dtype)
    ids, text, pooled, micro = uvit_inputs(fp32.config, 2, (4, 6), 77)
    with torch.no_grad():
        expected = fp32(ids, text, pooled, micro)
        got = half(ids, text.to(dtype), pooled.to(dtype), micro)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert relative_error(got.float(), expected) <= HALF_TOL[dtype]


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_512() -> UViT:
    return randomize_(UViT(uvit_config("tiny-512"))).eval()


def test_odd_token_grid_on_resampling_layout_raises(tiny_512):
    _, text, pooled, micro = uvit_inputs(tiny_512.config, 1, (4, 4), 5)
    with pytest.raises(ValueError, match=r"token grid 5x4 is not a multiple of 2"):
        tiny_512(torch.zeros(1, 5, 4, dtype=torch.long), text, pooled, micro)


def test_flat_token_sequence_raises(tiny_512):
    _, text, pooled, micro = uvit_inputs(tiny_512.config, 1, (4, 4), 5)
    with pytest.raises(ValueError, match=r"input_ids must be a token grid \(B, h, w\), got shape \(1, 16\)"):
        tiny_512(torch.zeros(1, 16, dtype=torch.long), text, pooled, micro)


def test_token_id_out_of_vocabulary_raises(tiny_512):
    ids, text, pooled, micro = uvit_inputs(tiny_512.config, 1, (4, 4), 5)
    ids[0, 0, 0] = tiny_512.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {tiny_512.config.vocab_size}\)"):
        tiny_512(ids, text, pooled, micro)


def test_float_token_ids_raise(tiny_512):
    ids, text, pooled, micro = uvit_inputs(tiny_512.config, 1, (4, 4), 5)
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        tiny_512(ids.float(), text, pooled, micro)


@pytest.mark.parametrize(
    "which,bad_shape,message",
    [
        ("text", (1, 5, 31), r"encoder_hidden_states must be \(B=1, L>=1, 32\), got \(1, 5, 31\)"),
        ("text", (2, 5, 32), r"encoder_hidden_states must be \(B=1, L>=1, 32\), got \(2, 5, 32\)"),
        ("text", (1, 0, 32), r"encoder_hidden_states must be \(B=1, L>=1, 32\), got \(1, 0, 32\)"),
        ("pooled", (1, 31), r"pooled_text_emb must be \(1, 32\), got \(1, 31\)"),
        ("micro", (1, 4), r"micro_conds must be \(1, 5\), got \(1, 4\)"),
        ("micro", (5,), r"micro_conds must be \(1, 5\), got \(5,\)"),
    ],
)
def test_wrong_conditioning_shape_raises(tiny_512, which, bad_shape, message):
    ids, text, pooled, micro = uvit_inputs(tiny_512.config, 1, (4, 4), 5)
    inputs = {"text": text, "pooled": pooled, "micro": micro}
    inputs[which] = torch.zeros(bad_shape)
    with pytest.raises(ValueError, match=message):
        tiny_512(ids, inputs["text"], inputs["pooled"], inputs["micro"])


# --- size ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,published", [(UViTConfig.amused_256, 603_537_664), (UViTConfig.amused_512, 608_257_792)], ids=["256", "512"]
)
def test_parameter_count_is_published(preset, published):
    """Built on the meta device (no memory, no init), ours and diffusers' of the same config both have the
    published number of parameters."""
    from diffusers import UVit2DModel

    cfg = preset()
    with torch.device("meta"):
        ours = UViT(cfg)
        ref = UVit2DModel(**cfg.to_diffusers_dict())
    assert sum(p.numel() for p in ours.parameters()) == published
    assert sum(p.numel() for p in ref.parameters()) == published


# --- ours beyond the reference: absolute positions -----------------------------------------------------------------


def test_without_positions_masked_interior_tokens_are_indistinguishable_and_sincos_tells_them_apart():
    """An all-masked grid (the first decoding step): the published layout knows a token's place only through the
    convolutions' zero padding, so interior tokens (at the same place of their 2x2 resampling cell) get the very same
    logits; position_embedding="sincos" (no
    parameters, the same state dict) gives every token its own."""
    cfg = UViTConfig.tiny(downsample=True, upsample=True, sample_size=16)
    plain = UViT(cfg).eval()
    placed = UViT(dataclasses.replace(cfg, position_embedding="sincos")).eval()
    assert plain.state_dict().keys() == placed.state_dict().keys()
    placed.load_state_dict(plain.state_dict())
    ids = torch.full((1, 16, 16), cfg.mask_token_id)
    text = torch.randn(1, 77, cfg.encoder_hidden_size), torch.randn(1, cfg.cond_embed_dim), torch.randn(1, 5)
    with torch.no_grad():
        a, b = plain(ids, *text)[0], placed(ids, *text)[0]  # (K, 16, 16)
    # the same place in its 2x2 cell (the down/upsampling's kernel position), away from the border
    interior = a[:, 6:12:2, 6:12:2].reshape(a.shape[0], -1)
    assert torch.equal(interior, interior[:, :1].expand_as(interior))
    distinct = {tuple(b[:, i, j].round(decimals=4).tolist()) for i in range(16) for j in range(16)}
    assert len(distinct) == 16 * 16


def test_a_position_embedding_is_refused_by_the_diffusers_export():
    from convert import ConversionError, uvit_to_diffusers

    with pytest.raises(ConversionError, match="position_embedding"):
        uvit_to_diffusers(UViT(UViTConfig.tiny(position_embedding="sincos")))
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        UViTConfig.tiny(position_embedding="learned")


# --- ours beyond the reference: blocks at the token grid -----------------------------------------------------------


@pytest.fixture(scope="module")
def full_res() -> UViT:
    """The tiny amused-512 layout (16x16 tokens brought to 8x8 inside) with two blocks at the token grid."""
    cfg = dataclasses.replace(uvit_config("tiny-512"), sample_size=16, full_res_blocks=2)
    return randomize_(UViT(cfg)).eval()


def test_full_resolution_blocks_run_on_the_upsampled_features_plus_the_token_embedding(full_res):
    """full_res_blocks=n: the plain layout up to the up-sampling (the same weights give the same features there),
    then the token embedding added back and n conditioned ConvNeXt blocks at the token grid, then the head. Checked
    against that computation written out on a plain model holding the shared weights."""
    cfg = full_res.config
    plain = UViT(dataclasses.replace(cfg, full_res_blocks=0)).eval()
    missing, unexpected = plain.load_state_dict(full_res.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("full_res.") for k in unexpected)
    ids, text, pooled, micro = uvit_inputs(cfg, 2, (16, 16), 7)
    upsampled = {}
    hook = plain.up.register_forward_hook(lambda module, args, out: upsampled.update(x=out))
    with torch.no_grad():
        plain_logits = plain.forward_channels_last(ids, text, pooled, micro)
        hook.remove()
        c, text_states = plain.embed_conditions(text, pooled, micro)
        x = upsampled["x"] + plain.token_embed(ids)  # (B, 16, 16, C)
        for block in full_res.full_res:
            x = block(x, block.prepare(c, text_states))
        want = plain.head(x)
        got = full_res.forward_channels_last(ids, text, pooled, micro)
    assert got.shape == (2, 16, 16, cfg.codebook_size)
    assert torch.equal(got, want)
    assert not torch.allclose(got, plain_logits)  # the blocks change the logits


def test_full_resolution_blocks_prepared_and_checkpointed_as_every_block(full_res):
    """The decoding loop's prepared conditioning covers the new blocks (bit-equal logits), and gradient
    checkpointing recomputes them to the very gradients of the plain backward, each of their weights reached."""
    inputs = uvit_inputs(full_res.config, 2, (16, 16), 7)
    ids, text, pooled, micro = inputs
    with torch.no_grad():
        cond = full_res.prepare(text, pooled, micro)
        assert torch.equal(full_res.forward_prepared(ids, cond), full_res.forward_channels_last(*inputs))
    model = UViT(full_res.config)
    model.load_state_dict(full_res.state_dict())
    model.train()
    plain = _loss_gradients(model, inputs)
    assert all(plain[k].abs().sum() > 0 for k in plain if k.startswith("full_res."))
    assert_same_gradients(plain, _loss_gradients(model.enable_gradient_checkpointing(), inputs))


def test_full_resolution_blocks_are_refused_by_the_diffusers_export_and_need_the_halved_grid():
    from convert import ConversionError, uvit_to_diffusers

    model = UViT(UViTConfig.tiny(downsample=True, upsample=True, full_res_blocks=1))
    assert model.config.ours_only() == {"full_res_blocks": 1}
    with pytest.raises(ConversionError, match="full_res_blocks=1"):
        uvit_to_diffusers(model)
    with pytest.raises(ValueError, match="full_res_blocks needs downsample"):
        UViTConfig.tiny(full_res_blocks=1)
    with pytest.raises(ValueError, match="full_res_blocks must be >= 0"):
        UViTConfig.tiny(downsample=True, upsample=True, full_res_blocks=-1)
    assert UViTConfig.tiny().ours_only() == {}
