"""The loss and the metrics against cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_msssim import ssim

from pipeline.train.config import LossWeights
from pipeline.train.loss import compute_loss, depth_ssim
from pipeline.train.metrics import MetricAccumulator, batch_iou

BIG = 20.0  # a logit whose sigmoid is 1 - 2e-9: a confident prediction


def logits_from(mask: torch.Tensor) -> torch.Tensor:
    """Confident logits that threshold to `mask`."""
    return torch.where(mask > 0.5, BIG, -BIG)


def depth_batch(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth depths in [0.2, 0.8], (n, 1, 80, 80)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 10, 10, generator=g)
    return 0.2 + 0.6 * torch.nn.functional.interpolate(coarse, size=(80, 80), mode="bilinear")


def metrics_of(mask_logits, mask_true, depth_pred=None, depth_true=None) -> dict[str, float]:
    depth_true = depth_batch(len(mask_true)) if depth_true is None else depth_true
    depth_pred = depth_true if depth_pred is None else depth_pred
    acc = MetricAccumulator()
    acc.update(mask_logits, depth_pred, mask_true, depth_true)
    return acc.compute()


def half_overlap() -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 masks: prediction in columns 0-3, truth in columns 2-5 (32 pixels each, 16 shared)."""
    pred = torch.zeros(1, 1, 8, 8)
    true = torch.zeros(1, 1, 8, 8)
    pred[..., 0:4] = 1
    true[..., 2:6] = 1
    return pred, true


def test_perfect_prediction_scores_perfectly():
    mask = (torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    m = metrics_of(logits_from(mask), mask, depth_batch(3), depth_batch(3))
    assert m["iou"] == 1.0 and m["dice"] == 1.0
    assert m["iou_pixel"] == 1.0 and m["dice_pixel"] == 1.0
    assert m["depth_rmse"] == 0.0 and m["depth_abs_rel"] == 0.0 and m["depth_delta1"] == 1.0
    assert m["depth_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert m["samples"] == 3 and isinstance(m["samples"], int)
    assert "loss" not in m


def test_all_wrong_mask_scores_zero():
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1
    mask[1, :, :, 5:] = 1
    m = metrics_of(logits_from(1 - mask), mask)
    assert m["iou"] == 0.0 and m["dice"] == 0.0 and m["iou_pixel"] == 0.0


def test_empty_prediction_of_empty_mask_counts_one():
    empty = torch.zeros(2, 1, 8, 8)
    m = metrics_of(logits_from(empty), empty)
    assert m["iou"] == 1.0 and m["dice"] == 1.0 and m["iou_pixel"] == 1.0


def test_half_overlap_by_hand():
    pred, true = half_overlap()
    m = metrics_of(logits_from(pred), true)
    assert m["iou"] == pytest.approx(16 / 48)  # 16 shared of 48 covered
    assert m["dice"] == pytest.approx(2 * 16 / 64)
    assert m["iou_pixel"] == pytest.approx(16 / 48)


def test_threshold_is_half_on_the_sigmoid_not_on_logits():
    true = torch.ones(1, 1, 4, 4)
    # sigmoid(0.1) = 0.52 > 0.5 (the published code's logits > 0.75 would call this empty).
    assert metrics_of(torch.full((1, 1, 4, 4), 0.1), true)["iou"] == 1.0
    assert metrics_of(torch.full((1, 1, 4, 4), -0.1), true)["iou"] == 0.0
    assert MetricAccumulator(threshold=0.6).threshold == 0.6
    with pytest.raises(ValueError, match="threshold"):
        MetricAccumulator(threshold=1.0)


def test_per_image_iou_differs_from_pixel_iou():
    # Image 0: 64 pixels right. Image 1: one stray pixel on an empty truth (IoU 0).
    true = torch.zeros(2, 1, 8, 8)
    true[0] = 1
    pred = true.clone()
    pred[1, 0, 0, 0] = 1
    m = metrics_of(logits_from(pred), true)
    assert m["iou"] == pytest.approx(0.5)
    assert m["iou_pixel"] == pytest.approx(64 / 65)
    assert m["dice"] == pytest.approx(0.5)
    assert m["dice_pixel"] == pytest.approx(2 * 64 / (65 + 64))


def test_batch_iou_is_the_per_image_mean():
    pred, true = half_overlap()
    pred = torch.cat([pred, torch.zeros_like(pred)])  # second image: empty vs empty, counts 1
    true = torch.cat([true, torch.zeros_like(true)])
    value = batch_iou(logits_from(pred), true)
    assert value.ndim == 0 and value.item() == pytest.approx((1 / 3 + 1) / 2)


def test_depth_metrics_by_hand():
    true = depth_batch(2)
    m = metrics_of(logits_from(torch.ones(2, 1, 4, 4)), torch.ones(2, 1, 4, 4), true * 1.1, true)
    assert m["depth_abs_rel"] == pytest.approx(0.1, rel=1e-5)
    assert m["depth_delta1"] == 1.0  # every ratio is 1.1 < 1.25
    assert m["depth_rmse"] == pytest.approx(0.1 * true.square().mean().sqrt().item(), rel=1e-5)
    m = metrics_of(logits_from(torch.ones(2, 1, 4, 4)), torch.ones(2, 1, 4, 4), true * 1.3, true)
    assert m["depth_delta1"] == 0.0


def test_abs_rel_and_delta1_skip_true_depths_below_eps():
    true = torch.full((1, 1, 16, 16), 0.5)
    true[..., :8] = 0.0  # half the pixels have no valid depth
    pred = torch.full_like(true, 0.6)  # on valid pixels: |0.6 - 0.5| / 0.5 = 0.2, ratio 1.2
    m = metrics_of(logits_from(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4), pred, true)
    assert m["depth_abs_rel"] == pytest.approx(0.2, rel=1e-5)
    assert m["depth_delta1"] == 1.0
    assert m["depth_rmse"] == pytest.approx(math.sqrt((0.6**2 + 0.1**2) / 2), rel=1e-5)


def test_two_updates_equal_one_update_on_the_concatenation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1, 16, 16, generator=g)
    mask = (torch.rand(6, 1, 16, 16, generator=g) > 0.5).float()
    pred, true = depth_batch(6, seed=4), depth_batch(6, seed=5)
    whole, parts = MetricAccumulator(), MetricAccumulator()
    whole.update(logits, pred, mask, true, loss=torch.tensor(2.0))
    parts.update(logits[:2], pred[:2], mask[:2], true[:2], loss=torch.tensor(2.0))
    parts.update(logits[2:], pred[2:], mask[2:], true[2:], loss=torch.tensor(2.0))
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys() and a["samples"] == b["samples"] == 6
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_loss_is_the_batch_size_weighted_mean():
    acc = MetricAccumulator()
    for n, loss in ((2, 1.0), (4, 4.0)):
        acc.update(
            torch.zeros(n, 1, 4, 4),
            depth_batch(n),
            torch.ones(n, 1, 4, 4),
            depth_batch(n),
            loss=torch.tensor(loss),
        )
    assert acc.compute()["loss"] == pytest.approx((2 * 1.0 + 4 * 4.0) / 6)


def test_published_iou_thresholds_raw_logits_and_targets_at_0_75_over_all_pixels():
    # Image 0: logits 0.5 (probability 0.62) count for our iou, not for the published one.
    # Image 1: truth 0.7 is foreground for us (> 0.5), background for the published IoU.
    logits = torch.full((2, 1, 4, 4), -5.0)
    true = torch.zeros(2, 1, 4, 4)
    logits[0, :, :, :2] = 0.5
    logits[0, :, :, 2] = 0.8  # above 0.75: predicted by both definitions
    true[0, :, :, 1:3] = 1.0
    logits[1, :, :2] = 3.0
    true[1, :, :2] = 0.7
    true[1, :, 0] = 0.9
    m = metrics_of(logits, true)
    # Published: image 0 P = column 2 (4 px), T = columns 1-2 (8 px): 4 shared, union 8;
    # image 1 P = rows 0-1 (8 px), T = row 0 (4 px): 4 shared, union 8. Pooled: 8 / 16.
    assert m["iou_published"] == pytest.approx(0.5)
    # Ours, per image: image 0 P = columns 0-2 (12), T = columns 1-2 (8): 8 / 12; image 1 P = T.
    assert m["iou"] == pytest.approx((8 / 12 + 1.0) / 2)


def test_published_iou_by_hand_against_the_jaccard_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 1, 16, 16, generator=g) * 2
    true = torch.rand(5, 1, 16, 16, generator=g)
    pred, truth = (logits > 0.75).flatten(), (true > 0.75).flatten()
    expected = (pred & truth).sum().item() / (pred | truth).sum().item()  # jaccard_score's
    acc = MetricAccumulator()
    for part in range(0, 5, 2):  # pooled over batches, not averaged over them
        batch = slice(part, part + 2)
        acc.update(logits[batch], depth_batch(len(logits[batch])), true[batch],
                   depth_batch(len(logits[batch])))  # fmt: skip
    assert acc.compute()["iou_published"] == pytest.approx(expected)
    # Nothing above 0.75 anywhere: 0, as jaccard_score gives.
    assert metrics_of(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))["iou_published"] == 0.0


def test_compute_without_updates_is_a_clear_error():
    with pytest.raises(ValueError, match="no sample to compute metrics of"):
        MetricAccumulator().compute()


def test_all_reduce_is_a_noop_without_distributed_and_never_counts_twice(tmp_path):
    pred, true = half_overlap()
    acc = MetricAccumulator()
    acc.update(logits_from(pred), depth_batch(1), true, depth_batch(1))
    before = acc.compute()
    assert before["iou_published"] == pytest.approx(16 / 48)  # reduced with the other sums
    acc.all_reduce()
    assert acc.compute() == before
    # A real (one-rank) gloo group: the sum runs, and a second call does not add twice.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        acc.all_reduce()
        acc.all_reduce()
        assert acc.compute() == before
    finally:
        torch.distributed.destroy_process_group()


def test_bce_matches_the_formula_and_ssim_term_is_zero_for_identical_depths():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    # -log sigmoid(x) = log(1 + e^-x) for target 1; -log(1 - sigmoid(x)) = log(1 + e^x) for 0.
    expected = (
        math.log1p(math.exp(-2))
        + math.log1p(math.exp(-1))
        + math.log1p(math.exp(0.5))
        + math.log1p(math.exp(3))
    ) / 4
    depth = depth_batch(1)
    loss, loss_mask, loss_depth = compute_loss(logits, depth, target, depth)
    assert loss_mask.item() == pytest.approx(expected, rel=1e-6)
    assert loss_depth.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(2.0 * expected, rel=1e-5)
    weighted, _, _ = compute_loss(logits, depth * 0.5, target, depth, LossWeights(1.0, 3.0))
    ssim_term = 1 - ssim(depth * 0.5, depth, data_range=1.0).item()
    assert weighted.item() == pytest.approx(expected + 3.0 * ssim_term, rel=1e-5)


def test_ssim_is_pytorch_msssim_and_float32_under_autocast():
    pred, true = depth_batch(3, seed=1), depth_batch(3, seed=2)
    reference = ssim(pred, true, data_range=1.0, size_average=False)
    assert torch.allclose(depth_ssim(pred, true, size_average=False), reference, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, loss_depth = compute_loss(
            torch.zeros(3, 1, 4, 4), pred.bfloat16(), torch.ones(3, 1, 4, 4), true
        )
    assert loss_depth.dtype == torch.float32
    expected = 1 - ssim(pred.bfloat16().float(), true, data_range=1.0).item()
    assert loss_depth.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
def test_update_and_loss_do_not_sync_the_host():
    device = torch.device("cuda")
    logits = torch.randn(4, 1, 160, 160, device=device)
    mask = (torch.rand(4, 1, 160, 160, device=device) > 0.5).float()
    pred, true = depth_batch(4).to(device), depth_batch(4, seed=1).to(device)
    acc = MetricAccumulator(device)
    acc.update(logits, pred, mask, true)  # warm-up: builds the cached SSIM window
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = compute_loss(logits, pred, mask, true)
        acc.update(logits, pred, mask, true, loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert acc.compute()["samples"] == 8
