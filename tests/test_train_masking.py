"""Masking and the masked-token loss, against independent computations of what the reference script does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.masking import IGNORE, MaskingConfig, apply_masks, draw_masks, masked_cross_entropy


def test_loss_equals_cross_entropy_over_the_masked_positions():
    """Fixed batch, fixed mask: our loss = mean over masked positions of -log softmax(logits)[label], computed here
    by hand in float64 from the (B, K, h, w) logits the U-ViT returns."""
    g = torch.Generator().manual_seed(0)
    B, K, h, w = 3, 16, 4, 5
    logits = torch.randn(B, K, h, w, generator=g) * 3  # the model's layout
    tokens = torch.randint(0, K, (B, h, w), generator=g)
    mask = torch.rand(B, h, w, generator=g) < 0.4
    mask[0, 0, 0] = True
    inputs, labels = apply_masks(tokens, mask, mask_id=K + 3)
    assert torch.equal(inputs[mask], torch.full((int(mask.sum()),), K + 3))
    assert torch.equal(inputs[~mask], tokens[~mask]) and torch.equal(labels[mask], tokens[mask])
    assert (labels[~mask] == IGNORE).all()

    loss = masked_cross_entropy(logits.permute(0, 2, 3, 1), labels)  # channels-last view, as the loop passes it
    terms = []
    for b, i, j in torch.nonzero(mask).tolist():
        row = logits[b, :, i, j].double()
        terms.append(-(row[tokens[b, i, j]] - torch.logsumexp(row, 0)))
    expected = torch.stack(terms).mean()
    assert abs(float(loss) - float(expected)) < 1e-5  # fp32 softmax over 16 codes vs float64


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_per_sample_loss_is_the_mean_of_each_samples_mean(smoothing):
    """loss_per_sample: mean over samples of the mean over that sample's masked positions, computed here in float64
    per sample with F.cross_entropy's own mean (label smoothing included); a sample with 1 masked token weighs what
    one with 11 does."""
    g = torch.Generator().manual_seed(2)
    B, K, h, w = 3, 12, 3, 4
    logits = torch.randn(B, h, w, K, generator=g) * 2
    tokens = torch.randint(0, K, (B, h, w), generator=g)
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    mask[0, 0, 0] = True  # 1 masked token
    mask[1].view(-1)[:11] = True  # 11
    mask[2].view(-1)[::2] = True  # 6
    _, labels = apply_masks(tokens, mask, mask_id=K)
    means = [
        F.cross_entropy(logits[b][mask[b]].double(), tokens[b][mask[b]], label_smoothing=smoothing) for b in range(B)
    ]
    expected = torch.stack(means).mean()
    loss = masked_cross_entropy(logits, labels, smoothing, per_sample=True)
    assert abs(float(loss) - float(expected)) < 1e-5
    token_mean = masked_cross_entropy(logits, labels, smoothing)
    assert abs(float(loss) - float(token_mean)) > 1e-3  # unequal counts: the two weightings differ
    # equal counts: the same as the token mean
    even = torch.zeros(B, h, w, dtype=torch.bool)
    even[:, 0] = True
    _, even_labels = apply_masks(tokens, even, mask_id=K)
    torch.testing.assert_close(
        masked_cross_entropy(logits, even_labels, smoothing, per_sample=True),
        masked_cross_entropy(logits, even_labels, smoothing),
        atol=1e-6,
        rtol=0,
    )
    # the loop's normalizer for process k of 3 holding one row each is G / world = 1: the processes' losses
    # averaged (as DDP averages their gradients) give the whole batch's
    parts = [masked_cross_entropy(logits[b : b + 1], labels[b : b + 1], smoothing, 3 / 3, True) for b in range(B)]
    torch.testing.assert_close(torch.stack(parts).mean(), loss, atol=1e-6, rtol=0)


def test_loss_matches_reference_formula_and_label_smoothing():
    """The reference: F.cross_entropy(logits (N, K), labels.view(-1), ignore_index=-100, reduction='mean')."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 3, 10, generator=g)
    labels = torch.randint(0, 10, (2, 3, 3), generator=g)
    labels[torch.rand(2, 3, 3, generator=g) < 0.5] = IGNORE
    ref = F.cross_entropy(logits.reshape(-1, 10), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(masked_cross_entropy(logits, labels), ref, atol=1e-6, rtol=0)
    ref_ls = F.cross_entropy(logits.reshape(-1, 10), labels.view(-1), ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(masked_cross_entropy(logits, labels, label_smoothing=0.1), ref_ls, atol=1e-6, rtol=0)
    # an explicit normalizer divides the sum instead (used to average over the global batch under DDP)
    n = int((labels != IGNORE).sum())
    torch.testing.assert_close(masked_cross_entropy(logits, labels, normalizer=2 * n), ref / 2, atol=1e-6, rtol=0)


def test_masks_are_the_reference_recipe():
    """The reference, from the same uniform draws: t ~ U(0,1); p = cos(t pi/2) clipped below by min_masking_rate;
    n = round(L p) >= 1; mask = argsort(U(0,1)^L) < n."""
    B, h, w, L = 64, 16, 16, 256
    masks = draw_masks(B, h, w, MaskingConfig(min_masking_rate=0.05), torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = torch.rand(B, generator=g)
    p = torch.cos(t * math.pi * 0.5).clip(0.05)
    n = (L * p).round().clamp(min=1)
    expected = torch.rand(B, L, generator=g).argsort(dim=-1) < n.unsqueeze(-1)
    assert torch.equal(masks.mask.view(B, L), expected)
    assert torch.equal(masks.mask.flatten(1).sum(1), n.long())  # exactly n per sample
    # t ~ U(0, 1): E[cos(t pi / 2)] = 2 / pi
    big = draw_masks(4096, 2, 2, MaskingConfig(), g)
    assert abs(float(big.ratio.mean()) - 2 / math.pi) < 0.02


@pytest.mark.parametrize(
    "schedule, ratio_of",
    [
        ("linear", lambda t: 1 - t),
        ("arccos", lambda t: torch.arccos(t) / (math.pi / 2)),
        ("power:0.5", lambda t: 1 - t.sqrt()),
    ],
)
def test_masking_schedule_draws_the_ratio_from_the_same_t(schedule, ratio_of):
    """--masking_schedule: the same uniform draws as the cosine's, r = schedule(t), n = round(L r) >= 1 exactly."""
    B, L = 64, 256
    masks = draw_masks(B, 16, 16, MaskingConfig(schedule=schedule), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.rand(B, generator=g)
    n = (L * ratio_of(t)).round().clamp(min=1)
    expected = torch.rand(B, L, generator=g).argsort(dim=-1) < n.unsqueeze(-1)
    assert torch.allclose(masks.ratio, ratio_of(t), atol=1e-6)
    assert torch.equal(masks.mask.view(B, L), expected)


def test_linear_schedule_masks_lightly_more_often_than_the_cosine():
    """The point of "linear": P(r < 0.1) is 0.1 under r = 1 - t, 1 - (2/pi) arccos(0.1) = 0.064 under the cosine."""
    light = {}
    for schedule in ("cosine", "linear"):
        ratio = draw_masks(20_000, 2, 2, MaskingConfig(schedule=schedule), torch.Generator().manual_seed(6)).ratio
        light[schedule] = float((ratio < 0.1).float().mean())
    assert abs(light["linear"] - 0.1) < 0.01 and abs(light["cosine"] - 0.0638) < 0.01, light


def test_unknown_masking_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown masking schedule 'square'"):
        MaskingConfig(schedule="square")


def test_min_masking_rate_is_a_lower_bound():
    masks = draw_masks(256, 8, 8, MaskingConfig(min_masking_rate=0.5), torch.Generator().manual_seed(3))
    assert float(masks.ratio.min()) >= 0.5
    assert int(masks.mask.flatten(1).sum(1).min()) >= 32


def test_rectangular_masks_are_one_rectangle_of_about_the_count():
    masks = draw_masks(64, 16, 16, MaskingConfig(rect_mask_prob=1.0), torch.Generator().manual_seed(4))
    for m, r in zip(masks.mask, masks.ratio):
        rows, cols = torch.nonzero(m, as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(box) == int(m.sum())  # a filled rectangle
        n = max(1, round(256 * float(r)))
        assert abs(int(m.sum()) - n) <= max(16, 0.5 * n)  # rounding the width to whole tokens


@pytest.mark.parametrize("world", [2, 4])
def test_global_masks_split_into_the_same_rows(world):
    """Every process draws the global batch from the same stream and keeps its rows: together they mask exactly
    what one process with the whole batch masks."""
    cfg = MaskingConfig(min_masking_rate=0.1, rect_mask_prob=0.3)
    whole = draw_masks(8, 4, 4, cfg, torch.Generator().manual_seed(5))
    per = 8 // world
    parts = [
        draw_masks(8, 4, 4, cfg, torch.Generator().manual_seed(5)).rows(r * per, (r + 1) * per) for r in range(world)
    ]
    assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
