"""Segmentation, anomaly and calibration metrics on torch tensors (any device).

``SegmentationMetric``       confusion matrix by ``bincount``; mIoU, per-class IoU, pixel accuracy.
``anomaly_metrics``          exact pooled AUROC / AP / FPR95 by sorting (agrees with scikit-learn, ties included).
``AnomalyMetric``            the same metrics streamed through fixed-size histograms: bounded memory for 10^8+
                             pixels.
``CalibrationMetric``        streamed expected calibration error and reliability-diagram data;
``expected_calibration_error`` the one-shot function.

Anomaly conventions (as in Fishyscapes / SegmentMeIfYouCan): scores are "higher = more anomalous"; labels are
1 = anomaly (the positive class), 0 = in-distribution, 255 = void (ignored); metrics are pooled over all pixels
of all images, not averaged per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gmmseg_core._checks import check_int, is_finite_real

__all__ = [
    "SegmentationMetric",
    "anomaly_metrics",
    "AnomalyMetric",
    "CalibrationMetric",
    "expected_calibration_error",
    "reliability_diagram",
]


# --------------------------------------------------------------------------------------------------------------
# Closed-set segmentation
# --------------------------------------------------------------------------------------------------------------


class SegmentationMetric:
    """Accumulate a confusion matrix over batches and report mIoU, per-class IoU and pixel accuracy.

    Parameters
    ----------
    num_classes : int
        Number of classes C (a Python or numpy integer); predictions and targets take values in ``0..C-1``.
    ignore_index : int, default 255
        Target value of pixels that are not counted.
    device : torch.device or str, optional
        Where the (C, C) int64 confusion matrix lives; defaults to the device of the first batch.

    Notes
    -----
    The IoU of class c is ``TP / (TP + FP + FN)``. A class that appears neither in the targets nor in the
    predictions has an empty union: its IoU is NaN (reported as such in ``per_class_iou``) and it is left out of
    the mean, as in MMSegmentation. A class that is predicted but absent from the targets has IoU 0 and counts.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        num_classes = check_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = None if device is None else torch.zeros(
            num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        pred : integer Tensor or array (B, H, W) or any shape
            Predicted class indices (e.g. ``logits.argmax(1)``); floating-point values are refused rather than
            truncated.
        target : integer Tensor or array, same shape as ``pred``
            Ground-truth class indices, ``ignore_index`` for unlabelled pixels.
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        for name, value in (("pred", pred), ("target", target)):
            if value.is_floating_point() or value.is_complex():
                raise TypeError(f"{name} must hold class indices (integers), got dtype {value.dtype}; take the "
                                "argmax of scores first")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        C = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).to(pred.device).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel():
            if int(target.min()) < 0 or int(target.max()) >= C:
                raise ValueError(f"target values must be in [0, {C}) or ignore_index={self.ignore_index}, got "
                                 f"range [{int(target.min())}, {int(target.max())}]")
            if int(pred.min()) < 0 or int(pred.max()) >= C:
                raise ValueError(f"pred values must be in [0, {C}), got range [{int(pred.min())}, "
                                 f"{int(pred.max())}]")
        counts = torch.bincount(target * C + pred, minlength=C * C).reshape(C, C)
        if self.confusion is None:
            self.confusion = torch.zeros(C, C, dtype=torch.int64, device=pred.device)
        self.confusion += counts.to(self.confusion.device)

    def all_reduce(self) -> None:
        """Sum the confusion matrix over the processes of a ``torch.distributed`` group (no-op without one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.confusion is not None:
            torch.distributed.all_reduce(self.confusion)

    def compute(self) -> dict:
        """Return ``{"miou", "per_class_iou", "pixel_acc", "mean_acc", "confusion"}``.

        ``miou``, ``pixel_acc`` and ``mean_acc`` are floats (NaN when nothing was counted), ``per_class_iou``
        a list of C floats (NaN for absent classes), ``confusion`` a (C, C) int64 numpy array with rows =
        targets and columns = predictions.
        """
        C = self.num_classes
        conf = (self.confusion.cpu() if self.confusion is not None
                else torch.zeros(C, C, dtype=torch.int64)).double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        support = conf.sum(1)
        acc = torch.where(support > 0, tp / support.clamp_min(1), torch.full_like(tp, float("nan")))
        total = conf.sum()
        present = ~torch.isnan(iou)
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "per_class_iou": [float(v) for v in iou],
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else float("nan"),
            "confusion": conf.long().numpy(),
        }


# --------------------------------------------------------------------------------------------------------------
# Anomaly metrics: shared curve arithmetic
# --------------------------------------------------------------------------------------------------------------


def _valid_scores_labels(scores, labels, ignore_index: int = 255):
    """Flatten, drop ``ignore_index`` pixels, check labels are 0/1; returns (float64 scores, bool positives)."""
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same shape, got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    scores, labels = scores[keep].double(), labels[keep]
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        bad = torch.unique(labels[(labels != 0) & (labels != 1)])[:5].tolist()
        raise ValueError(f"labels must be 0 (known), 1 (anomaly) or {ignore_index} (void), got values {bad}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, labels == 1


def _curve_from_counts(pos: torch.Tensor, neg: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """Curves and metrics from per-threshold counts.

    Parameters
    ----------
    pos, neg : (T,) int64
        Number of positive / negative pixels whose score equals (or falls in the bin of) each threshold,
        ordered by **decreasing** threshold; entries with ``pos + neg == 0`` must be removed beforehand.
    thresholds : (T,) float64
        The thresholds (for the returned curves).
    """
    tps = torch.cumsum(pos, 0)
    fps = torch.cumsum(neg, 0)
    n_pos, n_neg = int(tps[-1]) if tps.numel() else 0, int(fps[-1]) if fps.numel() else 0
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"anomaly metrics need both classes; got {n_pos} anomaly and {n_neg} known pixels")
    tps, fps = tps.double(), fps.double()
    tpr = tps / n_pos
    fpr = fps / n_neg
    precision = tps / (tps + fps)
    # ROC: trapezoid from (0, 0) through every distinct threshold, as sklearn.metrics.roc_auc_score.
    fpr0 = torch.cat([fpr.new_zeros(1), fpr])
    tpr0 = torch.cat([tpr.new_zeros(1), tpr])
    auroc = float(torch.sum((fpr0[1:] - fpr0[:-1]) * (tpr0[1:] + tpr0[:-1])) / 2)
    # AP: sum over thresholds of (R_n - R_{n-1}) P_n, as sklearn.metrics.average_precision_score (no
    # interpolation).
    ap = float(torch.sum((tpr0[1:] - tpr0[:-1]) * precision))
    # FPR95: the FPR at the highest threshold whose TPR reaches 0.95 (first point of the full ROC curve, as
    # sklearn's roc_curve(..., drop_intermediate=False), with tpr >= 0.95). tpr uses exact integer counts.
    first = int(torch.nonzero(tps >= 0.95 * n_pos)[0, 0])
    fpr95 = float(fpr[first])
    return {
        "auroc": auroc,
        "ap": ap,
        "fpr95": fpr95,
        "curves": {"thresholds": thresholds, "fpr": fpr, "tpr": tpr, "precision": precision, "recall": tpr},
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def check_max_curve_points(max_points) -> None:
    """A curve is thinned to ``max_points >= 2`` points (its first and last kept), or not at all (None)."""
    check_int("max_curve_points", max_points, minimum=2, optional=True)


def _thin_curves(curves: dict, max_points: int | None) -> dict:
    """At most ``max_points`` evenly spaced curve points (always keeping the last), as float64 numpy arrays."""
    n = curves["fpr"].numel()
    if max_points is not None and n > max_points:
        idx = torch.unique(torch.linspace(0, n - 1, int(max_points)).round().long())
    else:
        idx = torch.arange(n)
    return {k: v.cpu()[idx].numpy() for k, v in curves.items()}


def anomaly_metrics(scores, labels, ignore_index: int = 255, return_curves: bool = False,
                    max_curve_points: int | None = 1000) -> dict:
    """Exact pooled AUROC, average precision and FPR at 95% TPR.

    Parameters
    ----------
    scores : Tensor or array, any shape (e.g. (B, H, W))
        Anomaly scores, higher = more anomalous.
    labels : Tensor or array, same shape
        1 = anomaly (positive), 0 = known, ``ignore_index`` = void (excluded).
    return_curves : bool
        Also return ``"curves"``: dict of numpy arrays ``thresholds, fpr, tpr, precision, recall`` (one point
        per distinct score, thinned to ``max_curve_points``; ``None`` keeps all).

    Returns
    -------
    dict with floats ``auroc``, ``ap``, ``fpr95`` (and ``curves``).

    Notes
    -----
    Scores are sorted once (float64) and tied scores form a single threshold, exactly like
    ``sklearn.metrics.roc_auc_score`` / ``average_precision_score``. ``fpr95`` is the false-positive rate at
    the first (highest) threshold at which the true-positive rate is >= 0.95, without interpolation, as the
    SegmentMeIfYouCan evaluation code reads it; that code integrates its AP by trapezoids over binned thresholds
    instead of this step sum. Memory is O(N) and time O(N log N): for 10^8 pixels and more use
    :class:`AnomalyMetric`.
    """
    check_max_curve_points(max_curve_points)
    s, y = _valid_scores_labels(scores, labels, ignore_index)
    s, order = torch.sort(s, descending=True, stable=True)
    y = y[order]
    # one entry per distinct score: counts of positives / negatives at that score
    distinct, inverse = torch.unique_consecutive(s, return_inverse=True)
    pos = torch.zeros(distinct.numel(), dtype=torch.int64, device=s.device).index_add_(0, inverse, y.long())
    neg = torch.bincount(inverse, minlength=distinct.numel()) - pos
    out = _curve_from_counts(pos, neg, distinct)
    result = {k: out[k] for k in ("auroc", "ap", "fpr95")}
    if return_curves:
        result["curves"] = _thin_curves(out["curves"], max_curve_points)
    return result


# --------------------------------------------------------------------------------------------------------------
# Streaming anomaly metrics
# --------------------------------------------------------------------------------------------------------------


class AnomalyMetric:
    """Pooled AUROC / AP / FPR95 over any number of pixels in bounded memory, by histogramming the scores.

    Why not the exact (scikit-learn) path for 10^8 pixels: sorting needs every score in memory at once
    (10^8 float64 scores + labels + argsort indices + cumulative sums is several GB, and scikit-learn makes
    further float64 copies) and an O(N log N) sort; the histogram needs two fixed count arrays (16 MB at the
    default size) and O(N) work per batch, and it can be filled batch by batch during evaluation.

    Binning: scores of unknown range (``msp`` lives in [0, 1], GMM scores in the hundreds, and a few pixels can
    be far out) are mapped by the monotone transform ``t = asinh((s - center) / scale)`` and then binned
    uniformly on ``t`` in ``[-90, 90]``, which covers every finite float64 score up to 1e39 (beyond: clamped
    to the end bins). Near ``center`` the bins are linear with width ``~scale * 180 / num_bins``; far from it
    they become logarithmic with a relative width of ``~180 / num_bins``. So no score ever overflows and the
    resolution is fine where the data are. ``center`` and ``scale`` are data driven: the median and the
    interquartile range / 1.349 of the finite scores of the first batch that has valid pixels (a robust
    standard deviation; falls back to the standard deviation, then to ``max(|median|, 1) * 1e-3``; a batch with
    no finite score gives centre 0), unless given. Infinite scores go to the end bins. Because the
    transform is monotone, bins preserve the order of scores; pixels in one bin are treated as tied (identical
    scores always land in the same bin, so true ties are exact). The error in AUROC is at most the fraction of
    positive-negative pairs that share a bin; FPR95 is read at the first bin where the TPR reaches 0.95, so it
    can include that whole bin's negatives (with the default 2**20 bins, ~1e-4 of them for unit-scale data).
    Each update is binned in slices of ``SUBCHUNK`` pixels, so the temporary memory is bounded (tens of MB)
    whatever the batch size.

    Parameters
    ----------
    num_bins : int, default 2**20
        Number of histogram bins.
    ignore_index : int, default 255
    center, scale : float, optional
        Fix the transform instead of estimating it from the first batch; both finite, ``scale > 0``.
    device : torch.device or str, optional
        Where the histograms live (default: the device of the first batch).

    Examples
    --------
    >>> metric = AnomalyMetric()
    >>> for scores, labels in batches:          # doctest: +SKIP
    ...     metric.update(scores, labels)
    >>> metric.compute()["ap"]                  # doctest: +SKIP
    """

    T_MAX = 90.0

    def __init__(self, num_bins: int = 2 ** 20, ignore_index: int = 255, center: float | None = None,
                 scale: float | None = None, device=None):
        num_bins = check_int("num_bins", num_bins, minimum=2)
        if center is not None and not is_finite_real(center):
            raise ValueError(f"center must be a finite float or None, got {center!r}")
        if scale is not None and not (is_finite_real(scale) and scale > 0):
            raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")
        self.num_bins = num_bins
        self.ignore_index = ignore_index
        self.center = None if center is None else float(center)
        self.scale = None if scale is None else float(scale)
        self.device = device
        self.pos = None
        self.neg = None

    def _init_transform(self, s: torch.Tensor) -> None:
        # finite scores only: a batch that is mostly +-inf would give a NaN median and bin every pixel alike
        sample = s[torch.isfinite(s)]
        if sample.numel() > 1_000_000:  # quantiles of a strided subsample: cheap and plenty for a scale
            sample = sample[:: sample.numel() // 1_000_000 + 1]
        if self.center is None:
            self.center = float(torch.quantile(sample, 0.5)) if sample.numel() else 0.0
        if self.scale is None:
            scale = 0.0
            if sample.numel():
                q1, q3 = torch.quantile(sample, torch.tensor([0.25, 0.75], dtype=sample.dtype,
                                                             device=sample.device))
                scale = float(q3 - q1) / 1.349
            if not scale > 0 or not math.isfinite(scale):
                scale = float(sample.std()) if sample.numel() > 1 else 0.0
            if not scale > 0 or not math.isfinite(scale):
                scale = max(abs(self.center), 1.0) * 1e-3
            self.scale = scale

    def _bin(self, s: torch.Tensor) -> torch.Tensor:
        t = s.sub(self.center).div_(self.scale).asinh_()   # in place after the first op: fewer passes
        idx = t.add_(self.T_MAX).mul_(self.num_bins / (2 * self.T_MAX)).floor_()
        return idx.clamp_(0, self.num_bins - 1).long()

    def _edges(self, idx: torch.Tensor) -> torch.Tensor:
        """Lower edge (in score units) of the bins ``idx``, used as their threshold."""
        t = idx.double() * (2 * self.T_MAX / self.num_bins) - self.T_MAX
        return torch.sinh(t) * self.scale + self.center

    SUBCHUNK = 1 << 20  # pixels binned at a time: bounds the temporary memory whatever the batch size

    @torch.no_grad()
    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``scores`` and ``labels`` of the same shape (e.g. (B, H, W)); labels 0/1/ignore."""
        scores = torch.as_tensor(scores)
        labels = torch.as_tensor(labels, device=scores.device)
        if scores.shape != labels.shape:
            raise ValueError(f"scores and labels must have the same shape, got {tuple(scores.shape)} and "
                             f"{tuple(labels.shape)}")
        scores, labels = scores.reshape(-1), labels.reshape(-1)
        for start in range(0, scores.numel(), self.SUBCHUNK):
            self._update_flat(scores[start:start + self.SUBCHUNK], labels[start:start + self.SUBCHUNK])

    def _update_flat(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        s, y = _valid_scores_labels(scores, labels, self.ignore_index)
        if s.numel() == 0:
            return
        if self.center is None or self.scale is None:
            self._init_transform(s)
        if self.pos is None:
            device = self.device if self.device is not None else s.device
            self.pos = torch.zeros(self.num_bins, dtype=torch.int64, device=device)
            self.neg = torch.zeros(self.num_bins, dtype=torch.int64, device=device)
        # one bincount over (bin, label) pairs: entry 2 b + 1 counts anomalies of bin b, 2 b known pixels
        counts = torch.bincount(self._bin(s) * 2 + y, minlength=2 * self.num_bins).reshape(-1, 2)
        self.pos += counts[:, 1].to(self.pos.device)
        self.neg += counts[:, 0].to(self.neg.device)

    def all_reduce(self) -> None:
        """Sum the histograms over a ``torch.distributed`` group (no-op without one; needs fixed center/scale)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.pos is not None:
            torch.distributed.all_reduce(self.pos)
            torch.distributed.all_reduce(self.neg)

    def compute(self, max_curve_points: int | None = 1000) -> dict:
        """Return ``{"auroc", "ap", "fpr95", "curves", "n_pos", "n_neg"}``.

        ``curves`` holds numpy arrays ``thresholds, fpr, tpr, precision, recall`` ordered by decreasing
        threshold (one point per non-empty bin, thinned to ``max_curve_points``; ``None`` keeps all).
        """
        check_max_curve_points(max_curve_points)
        if self.pos is None:
            raise ValueError("AnomalyMetric.compute() called before any update with valid pixels")
        pos, neg = self.pos.flip(0), self.neg.flip(0)
        idx = torch.arange(self.num_bins - 1, -1, -1, device=pos.device)
        keep = (pos + neg) > 0
        out = _curve_from_counts(pos[keep], neg[keep], self._edges(idx[keep]))
        return {"auroc": out["auroc"], "ap": out["ap"], "fpr95": out["fpr95"],
                "curves": _thin_curves(out["curves"], max_curve_points),
                "n_pos": out["n_pos"], "n_neg": out["n_neg"]}


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def _confidences(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(confidence, correct) of the valid pixels; probs (N, C) or (B, C, H, W), labels (N,) or (B, H, W)."""
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels, device=probs.device)
    if probs.dim() == 4:
        probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    elif probs.dim() != 2:
        raise ValueError(f"probs must be (N, C) or (B, C, H, W), got shape {tuple(probs.shape)}")
    labels = labels.reshape(-1)
    if labels.numel() != probs.shape[0]:
        raise ValueError(f"labels must have one entry per row/pixel of probs ({probs.shape[0]}), got "
                         f"{labels.numel()}")
    keep = labels != ignore_index
    # float32 or wider: a float64 confidence on a bin edge (0.2) must not move past it by rounding
    conf, pred = probs[keep].to(torch.promote_types(probs.dtype, torch.float32)).max(1)
    if conf.numel():
        lo, hi = (float(v) for v in torch.aminmax(conf))
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("probs contain NaN")
        if lo < 0.0 or hi > 1.0 + 1e-5:
            raise ValueError(f"probs must be class probabilities in [0, 1] (e.g. logits.softmax(1)); their row "
                             f"maxima span [{lo:.3g}, {hi:.3g}]")
    return conf, pred == labels[keep]


class CalibrationMetric:
    """Streamed expected calibration error (ECE) of a class posterior, with reliability-diagram data.

    Confidence = max class probability, correct = argmax == label. Bins split [0, 1] into ``n_bins`` equal
    intervals ``(lo, hi]`` (confidence 0 goes to the first). ECE = sum_b (n_b / N) |acc_b - conf_b|.
    """

    def __init__(self, n_bins: int = 15, ignore_index: int = 255):
        n_bins = check_int("n_bins", n_bins)
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(n_bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(n_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: probs (N, C) or (B, C, H, W) (rows sum to 1), labels (N,) or (B, H, W)."""
        conf, correct = _confidences(probs, labels, self.ignore_index)
        # bin b holds (b / n, (b + 1) / n]: compared with the edges themselves, since ceil(conf * n) - 1 misplaces
        # confidences on an edge (0.6 * 5 = 3.0000000000000004)
        inner_edges = torch.arange(1, self.n_bins, dtype=torch.float64, device=conf.device) / self.n_bins
        b = torch.bucketize(conf.double(), inner_edges)
        self.count += torch.bincount(b, minlength=self.n_bins).double().cpu()
        self.conf_sum += torch.zeros(self.n_bins, dtype=torch.float64, device=b.device).index_add_(
            0, b, conf.double()).cpu()
        self.correct_sum += torch.bincount(b, weights=correct.double(), minlength=self.n_bins).cpu()

    def compute(self) -> dict:
        """Return ``{"ece", "bin_edges" (n_bins+1,), "bin_count", "bin_confidence", "bin_accuracy"}`` (numpy;
        empty bins have NaN confidence/accuracy)."""
        n = self.count.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            count = self.count.numpy()
            conf = self.conf_sum.numpy() / count
            acc = self.correct_sum.numpy() / count
        ece = float(torch.sum((self.correct_sum - self.conf_sum).abs()) / n) if n > 0 else float("nan")
        return {"ece": ece, "bin_edges": np.linspace(0.0, 1.0, self.n_bins + 1), "bin_count": count,
                "bin_confidence": conf, "bin_accuracy": acc}


def expected_calibration_error(probs, labels, n_bins: int = 15, ignore_index: int = 255) -> float:
    """Expected calibration error of class probabilities.

    Parameters
    ----------
    probs : Tensor (N, C) or (B, C, H, W)
        Class posterior (e.g. ``logits.softmax(1)``).
    labels : LongTensor (N,) or (B, H, W)
        True classes; ``ignore_index`` pixels are excluded.
    n_bins : int, default 15
        Equal-width confidence bins.

    Returns
    -------
    float: sum over bins of (fraction of pixels in the bin) x |accuracy - mean confidence|.
    """
    metric = CalibrationMetric(n_bins=n_bins, ignore_index=ignore_index)
    metric.update(probs, labels)
    return metric.compute()["ece"]


def reliability_diagram(probs, labels, n_bins: int = 15, ignore_index: int = 255) -> dict:
    """Reliability-diagram data: per-bin count, mean confidence and accuracy (see :class:`CalibrationMetric`)."""
    metric = CalibrationMetric(n_bins=n_bins, ignore_index=ignore_index)
    metric.update(probs, labels)
    return metric.compute()
