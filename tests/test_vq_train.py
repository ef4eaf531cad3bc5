"""VQ-GAN training pieces (train.vq) and the reduced recipe of the embedded default model (train.default_model)."""

from __future__ import annotations

import pytest
import torch

from train.vq import (
    CodebookUsage,
    PatchDiscriminator,
    PerceptualLoss,
    VQTrainConfig,
    adaptive_weight,
    evaluate_vqgan,
    hinge_d_loss,
    hinge_g_loss,
    psnr,
    random_crops,
    reconstruction_loss,
    restart_dead_codes,
    train_vqgan,
    vq_step,
)
from vqgan import VQGAN, VQGANConfig
from vqgan.model import VectorQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_vq(seed: int = 0) -> VQGAN:
    """Two levels of 8 and 16 channels (factor 2), 32 codes of 4: small enough to train for a few steps in a test."""
    torch.manual_seed(seed)
    return VQGAN(
        VQGANConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4, num_vq_embeddings=32, latent_channels=4)
    )


# --- quantizer: straight-through estimator and the two VQ losses ------------------------------------------------------


def test_straight_through_passes_the_gradient_unchanged_to_the_latents():
    q = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # d quantized / d z = identity
    assert q.codebook.weight.grad is None  # the reconstruction path gives the codebook nothing


def test_quantized_forward_value_is_the_nearest_code():
    q = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    codes = q.codebook.weight[out.ids].permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized, codes, atol=1e-6)
    d = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4), q.codebook.weight)
    assert torch.equal(out.ids.flatten(), d.argmin(1))


def test_codebook_loss_moves_only_codes_and_commitment_only_the_encoder():
    q = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None and q.codebook.weight.grad.abs().sum() > 0
    q.codebook.weight.grad = None
    out.commitment_loss.backward()
    assert z.grad.abs().sum() > 0 and q.codebook.weight.grad is None
    expected = ((q.codebook.weight[out.ids].permute(0, 3, 1, 2) - z) ** 2).mean()
    assert torch.allclose(out.commitment_loss, expected) and torch.allclose(out.codebook_loss, expected)


def test_reconstruction_gradient_reaches_the_encoder_through_the_quantizer():
    model = tiny_vq()
    x = torch.rand(2, 3, 16, 16)
    x_hat, q, _ = vq_step(model, x)
    reconstruction_loss(x, x_hat).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


# --- losses ------------------------------------------------------------------------------------------------------------


def test_reconstruction_loss_is_l1_plus_mse():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert float(reconstruction_loss(x, y, 1.0, 1.0)) == pytest.approx(0.5 + 0.25)
    assert float(reconstruction_loss(x, y, 0.0, 2.0)) == pytest.approx(0.5)


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.75)
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3 * w).sum()  # gradient (3, 3): norm 3 sqrt 2
    gan = (w * torch.tensor([1.0, 0.0])).sum()  # gradient (1, 0): norm 1
    lam = adaptive_weight(rec, gan, w)
    assert float(lam) == pytest.approx(3 * 2**0.5 / (1 + 1e-4), rel=1e-6)
    assert not lam.requires_grad


def test_patch_discriminator_gives_one_logit_per_patch():
    d = PatchDiscriminator(channels=8, layers=3)
    assert d(torch.rand(2, 3, 64, 64)).shape == (2, 1, 8, 8)


def test_our_vgg16_features_have_torchvisions_names_and_shapes():
    tv = pytest.importorskip("torchvision.models.vgg")
    from train.vq import vgg16_features

    theirs = tv.make_layers(tv.cfgs["D"]).state_dict()
    ours = vgg16_features().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_perceptual_loss_needs_user_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16"):
        PerceptualLoss(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_perceptual_loss_with_supplied_weights(tmp_path):
    from safetensors.torch import save_file

    from train.vq import vgg16_features

    torch.manual_seed(0)
    weights = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    save_file(weights, str(tmp_path / "vgg16.safetensors"))
    loss = PerceptualLoss(tmp_path / "vgg16.safetensors")
    x = torch.rand(1, 3, 32, 32)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, torch.rand(1, 3, 32, 32))) > 0
    save_file({"nonsense": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a vgg16"):
        PerceptualLoss(tmp_path / "bad.safetensors")


# --- codebook usage and dead-code restarts -----------------------------------------------------------------------------


def test_usage_counts_and_perplexity():
    u = CodebookUsage(4)
    u.update(torch.tensor([[0, 0], [1, 1]]))
    assert u.counts.tolist() == [2, 2, 0, 0]
    assert u.usage() == 0.5 and u.perplexity() == pytest.approx(2.0)
    assert u.dead().tolist() == [False, False, True, True]
    u.reset()
    assert u.counts.sum() == 0


def test_dead_codes_are_restarted_onto_latents_and_then_used():
    q = VectorQuantizer(8, 2)
    with torch.no_grad():
        q.codebook.weight[:] = torch.tensor([[0.0, 0.0]] * 2 + [[100.0, 100.0]] * 6)  # six codes far from any latent
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 2, 4, 4, generator=g)
    usage = CodebookUsage(8)
    usage.update(q(z).ids)
    dead = usage.dead()
    assert int(dead.sum()) >= 6
    opt = torch.optim.Adam(q.parameters())
    q.codebook_loss = None
    q(z).codebook_loss.backward()
    opt.step()
    n = restart_dead_codes(q, z, dead, torch.Generator().manual_seed(1), noise=0.0, optimizer=opt)
    assert n == int(dead.sum())
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in q.codebook.weight[dead]:
        assert (flat - code).norm(dim=1).min() < 1e-6  # each restarted code sits on a latent
    assert float(opt.state[q.codebook.weight]["exp_avg"][dead].abs().sum()) == 0.0
    usage.reset()
    usage.update(q(z).ids)
    assert usage.usage() > 2 / 8


def test_psnr():
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, x - 1.0) == pytest.approx(psnr(x, x), abs=1e-6)  # clipped to [0, 1] first


# --- the loop ------------------------------------------------------------------------------------------------------------


def _batches(seed=0):
    import torch.nn.functional as F

    from muse.shapes import render, sample_scenes

    k = 0
    while True:
        yield F.avg_pool2d(render(sample_scenes(8, seed * 1000 + k)), 4)  # 16x16 keeps the test fast
        k += 1


@pytest.mark.slow
def test_vq_training_lowers_the_loss_and_restarts_codes():
    model = tiny_vq()
    cfg = VQTrainConfig(steps=40, batch_size=8, lr=2e-3, warmup=5, restart_every=10, log_every=0)
    history = train_vqgan(model, _batches(), cfg, progress=False)
    first, last = sum(r["rec"] for r in history[:5]) / 5, sum(r["rec"] for r in history[-5:]) / 5
    assert last < 0.6 * first
    assert sum(r.get("restarted", 0) for r in history) > 0
    assert "usage" in history[9] and "perplexity" in history[9]


@pytest.mark.slow
def test_vq_training_with_the_discriminator_runs_and_weighs_it():
    model = tiny_vq()
    cfg = VQTrainConfig(steps=6, batch_size=4, disc_start=3, disc_channels=8, restart_every=0, log_every=0)
    history = train_vqgan(model, _batches(1), cfg, progress=False)
    assert "gan_weight" not in history[2] and "gan_d" in history[3] and history[3]["gan_weight"] > 0


@pytest.mark.slow
def test_vq_training_is_deterministic_from_the_seed():
    runs = []
    for _ in range(2):
        model = tiny_vq(seed=3)
        cfg = VQTrainConfig(steps=4, batch_size=4, restart_every=2, log_every=0, seed=5)
        runs.append([r["rec"] for r in train_vqgan(model, _batches(2), cfg, progress=False)])
    assert runs[0] == runs[1]


def test_random_crops_are_windows_of_each_image_on_the_token_grid():
    x = torch.rand(6, 3, 16, 16)
    crops = random_crops(x, 8, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 8, 8)
    corners = set()
    for b in range(6):  # each crop is its own image's window at a corner on the grid of 4 (values are continuous)
        found = [
            (t, c)
            for t in range(0, 9, 4)
            for c in range(0, 9, 4)
            if torch.equal(crops[b], x[b, :, t : t + 8, c : c + 8])
        ]
        assert len(found) == 1, b
        corners.add(found[0])
    assert len(corners) > 1  # not one window for the whole batch
    again = random_crops(x, 8, 4, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)
    # every corner on the grid is drawn, the last ones (8, *) and (*, 8) included
    ramp = torch.arange(16.0).view(1, 1, 16, 1) * 16 + torch.arange(16.0).view(1, 1, 1, 16)  # value = 16 row + col
    many = random_crops(ramp.expand(200, 3, 16, 16), 8, 4, torch.Generator().manual_seed(1))
    drawn = {(int(v) // 16, int(v) % 16) for v in many[:, 0, 0, 0]}
    assert drawn == {(t, c) for t in (0, 4, 8) for c in (0, 4, 8)}


def test_crop_until_must_be_a_fraction():
    cfg = VQTrainConfig(steps=2, batch_size=2, restart_every=0, log_every=0, crop_size=8, crop_until=1.5)
    with pytest.raises(ValueError, match="crop_until is a fraction of the steps in \\[0, 1\\], got 1.5"):
        train_vqgan(tiny_vq(), _batches(), cfg, progress=False)


def test_random_crops_refuse_a_window_off_the_grid_or_larger_than_the_image():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="crop_size 6 must be a multiple of 4"):
        random_crops(x, 6, 4, torch.Generator())
    with pytest.raises(ValueError, match="at most the image side 16"):
        random_crops(x, 32, 4, torch.Generator())


def test_vq_training_on_crops_sees_crops_first_and_whole_images_after():
    model = tiny_vq()
    seen = []
    decode = model.decode_latents

    def record(z):
        seen.append(tuple(z.shape[-2:]))
        return decode(z)

    model.decode_latents = record
    cfg = VQTrainConfig(steps=8, batch_size=4, restart_every=0, log_every=0, crop_size=8, crop_until=0.5)
    train_vqgan(model, _batches(), cfg, progress=False)  # 16x16 images, factor 2: 8x8 latents, crops 4x4
    assert seen == [(4, 4)] * 4 + [(8, 8)] * 4


def test_evaluate_reports_psnr_and_usage():
    model = tiny_vq()
    images = next(_batches())
    report = evaluate_vqgan(model, images)
    assert set(report) >= {"psnr", "usage", "perplexity", "codes_used"}
    assert 0 < report["usage"] <= 1 and report["codes_used"] == round(report["usage"] * 32)
