"""The evaluation metrics for mask and depth, and their running sums (pure torch, no host syncs)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.train.loss import depth_ssim

# The order of the running sums in MetricAccumulator's one float64 vector (one all_reduce for all).
_SUMS = (
    "samples",
    "iou",  # sum over images of per-image IoU
    "dice",
    "intersection",  # pixels, over all images
    "union",
    "pred_plus_true",  # |P| + |T|, the Dice denominator
    "depth_squared_error",
    "depth_valid",  # pixels whose true depth is above eps
    "depth_abs_rel",
    "depth_delta1",
    "depth_ssim",  # sum over images of per-image SSIM
    "depth_pixels",
    "loss",  # sum of batch loss * batch size
    "loss_samples",
    "skipped",  # samples the loader could not decode (not in the metrics)
    "published_intersection",  # pixels, over all images, by the published IoU's definition
    "published_union",
)
_INDEX = {name: i for i, name in enumerate(_SUMS)}
# The published IoU thresholds both the target and the raw logits (not probabilities) at this.
PUBLISHED_THRESHOLD = 0.75


def mask_counts(
    mask_logits: Tensor, mask_true: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Per image (B,), float64: |P & T|, |P | T|, |P| + |T| (P: sigmoid > threshold, T: > 0.5)."""
    # sigmoid(x) > t exactly when x > logit(t): no sigmoid over the whole batch.
    pred = (mask_logits > math.log(threshold / (1.0 - threshold))).flatten(1)
    true = (mask_true > 0.5).flatten(1)
    intersection = (pred & true).sum(1, dtype=torch.float64)
    total = pred.sum(1, dtype=torch.float64) + true.sum(1, dtype=torch.float64)
    return intersection, total - intersection, total


def published_counts(mask_logits: Tensor, mask_true: Tensor) -> Tensor:
    """[|P & T|, |P | T|] over the batch's pixels, float64, as the published IoU counts them.

    The published code scored `jaccard_score(mask_true > 0.75, mask_logits > 0.75)`: the raw
    logits against 0.75 (a probability above sigmoid(0.75) = 0.68), every pixel pooled.
    """
    pred = mask_logits > PUBLISHED_THRESHOLD
    true = mask_true > PUBLISHED_THRESHOLD
    intersection = (pred & true).sum(dtype=torch.float64)
    return torch.stack([intersection, (pred | true).sum(dtype=torch.float64)])


def iou_dice(intersection: Tensor, union: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image IoU and Dice from mask_counts; an image with both masks empty scores 1."""
    empty = union == 0  # both empty: a perfect answer, not 0/0
    iou = torch.where(empty, 1.0, intersection / union.clamp_min(1.0))
    dice = torch.where(empty, 1.0, 2.0 * intersection / total.clamp_min(1.0))
    return iou, dice


def batch_iou(mask_logits: Tensor, mask_true: Tensor) -> Tensor:
    """The mean over images of per-image IoU for one batch, a 0-d tensor on the inputs' device."""
    return iou_dice(*mask_counts(mask_logits, mask_true))[0].mean()


class MetricAccumulator:
    """Running sums of the mask and depth metrics over batches, reducible across DDP ranks."""

    def __init__(
        self, device: torch.device | str = "cpu", threshold: float = 0.5, eps: float = 1e-3
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(
                f"the mask threshold must lie strictly between 0 and 1, got {threshold}"
            )
        self.device = torch.device(device)
        self.threshold = threshold  # on the predicted probability; targets binarise at 0.5
        self.eps = eps  # true depths at or below it are left out of AbsRel and delta1
        self._sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        self._reduced: Tensor | None = None

    def update(
        self,
        mask_logits: Tensor,
        depth_pred: Tensor,
        mask_true: Tensor,
        depth_true: Tensor,
        loss: Tensor | None = None,
    ) -> None:
        """Add one batch; everything stays on the device (no .item(), no host sync)."""
        n = mask_logits.shape[0]
        counts = mask_counts(mask_logits, mask_true, self.threshold)
        iou, dice = iou_dice(*counts)
        depth = _depth_terms(depth_pred.float(), depth_true.float(), self.eps)
        per_image_ssim = depth_ssim(depth_pred, depth_true, size_average=False)
        values = [iou, dice, *counts, *depth, per_image_ssim]
        # One stacked add for the sums computed on the device, in _SUMS order from "iou".
        sums = torch.stack([v.sum(dtype=torch.float64) for v in values])
        self._sums[_INDEX["iou"] : _INDEX["depth_ssim"] + 1] += sums.to(self.device)
        published = published_counts(mask_logits, mask_true).to(self.device)
        self._sums[_INDEX["published_intersection"] :] += published
        # Python numbers are kernel arguments: adding them needs no host-to-device copy.
        self._sums[_INDEX["samples"]] += n
        self._sums[_INDEX["depth_pixels"]] += depth_true.numel()
        if loss is not None:
            self._sums[_INDEX["loss"]] += loss.detach().to(self.device, torch.float64) * n
            self._sums[_INDEX["loss_samples"]] += n
        self._reduced = None

    def add_skipped(self, count: int) -> None:
        """Count samples the loader skipped (undecodable): reported beside the metrics."""
        self._sums[_INDEX["skipped"]] += count
        self._reduced = None

    def all_reduce(self) -> None:
        """Sum the running sums across ranks when torch.distributed is initialized; else no-op."""
        reduced = self._sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        # Kept apart from the local sums, so calling this twice does not count twice.
        self._reduced = reduced

    def compute(self) -> dict[str, float]:
        """The metrics so far (after all_reduce, over all ranks); one host sync."""
        sums = self._reduced if self._reduced is not None else self._sums
        s = dict(zip(_SUMS, sums.tolist(), strict=True))
        n = s["samples"]
        if n == 0:
            raise ValueError(
                "no sample to compute metrics of: the split holds none, or none of its samples "
                "could be decoded (the warnings name them)"
            )
        valid = s["depth_valid"]
        out = {
            "iou": s["iou"] / n,
            "dice": s["dice"] / n,
            "iou_pixel": s["intersection"] / s["union"] if s["union"] else 1.0,
            "dice_pixel": 2 * s["intersection"] / s["pred_plus_true"] if s["union"] else 1.0,
            # sklearn's jaccard_score gives 0 when both masks are empty everywhere.
            "iou_published": (
                s["published_intersection"] / s["published_union"] if s["published_union"] else 0.0
            ),
            "depth_rmse": (s["depth_squared_error"] / s["depth_pixels"]) ** 0.5,
            # No true depth above eps anywhere: these two are undefined.
            "depth_abs_rel": s["depth_abs_rel"] / valid if valid else float("nan"),
            "depth_delta1": s["depth_delta1"] / valid if valid else float("nan"),
            "depth_ssim": s["depth_ssim"] / n,
            "samples": int(n),
            "skipped": int(s["skipped"]),
        }
        if s["loss_samples"]:
            out["loss"] = s["loss"] / s["loss_samples"]
        return out


def _depth_terms(pred: Tensor, true: Tensor, eps: float) -> list[Tensor]:
    """Per-pixel terms to sum: squared error, valid (true > eps), AbsRel and delta1 on valid."""
    error = pred - true
    valid = true > eps
    safe_true = true.clamp_min(eps)  # no 0/0 where the pixel is left out anyway
    ratio = torch.maximum(pred / safe_true, safe_true / pred)  # pred = 0 gives inf: not < 1.25
    return [
        error.double().square(),
        valid,
        (error.abs() / safe_true).masked_fill_(~valid, 0.0),
        valid & (ratio < 1.25),
    ]
