"""Inference (whole image or sliding window) and the closed-set and anomaly evaluations.

``predict``                  model outputs for a batch: logits and, for a GMM model, class log-likelihoods
``evaluate_closed_set``      mIoU, per-class IoU, pixel accuracy and ECE over a dataset
``collect_sml_statistics``   per-class max-logit statistics on training data for the ``sml`` scorer
``evaluate_anomaly``         AUROC / AP / FPR95 of several anomaly scorers on an anomaly split

A model is anything with the :func:`gmmseg_core.models.build_model` interface: ``model(images)`` -> logits at
input size, ``model.is_generative`` and, when generative, ``model.class_log_likelihood(images)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, default_collate

from gmmseg_core._checks import check_int
from gmmseg_core._files import progress_bar
from gmmseg_core.data.base import check_size_pair, evenly_spaced
from gmmseg_core.metrics import (
    AnomalyMetric,
    CalibrationMetric,
    SegmentationMetric,
    anomaly_metrics,
    check_max_curve_points,
)
from gmmseg_core.scoring import SCORERS, SMLStatistics, scorer_names

__all__ = ["predict", "evaluate_closed_set", "evaluate_anomaly", "collect_sml_statistics",
           "default_scorers"]

LOGIT_SCORERS = ("msp", "max_logit", "energy", "entropy")


@contextmanager
def _eval_mode(model):
    """``model.eval()`` for the block; the model's own mode is back afterwards, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _is_generative(model) -> bool:
    return bool(getattr(model, "is_generative", False))


def _forward(model, images: torch.Tensor, generative: bool) -> dict:
    size = images.shape[-2:]
    if generative and hasattr(model, "backbone") and hasattr(model, "head"):
        # one backbone pass for both outputs (SegmentationModel layout)
        features = model.backbone(images)
        return {"logits": interpolate_logits(model.head(features), size).float(),
                "log_likelihood": interpolate_logits(model.head.class_log_likelihood(features), size).float()}
    out = {"logits": model(images).float()}
    if generative:
        out["log_likelihood"] = model.class_log_likelihood(images).float()
    return out


def _pair(v, name) -> tuple[int, int]:
    """(height, width) of a sliding window's ``crop_size`` or ``stride``: a positive int or a pair of them."""
    if v is None:
        raise ValueError(f"{name} is required for mode='slide'")
    return check_size_pair(name, v)


def slide_window(crop_size, stride=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((crop_h, crop_w), (stride_h, stride_w))`` of :func:`predict`'s ``"slide"`` mode, ``ValueError`` for what it
    refuses: a missing or bad ``crop_size``, a bad ``stride`` or one larger than the window (default stride:
    2/3 of the window)."""
    ch, cw = _pair(crop_size, "crop_size")
    if stride is None:
        stride = (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    sh, sw = _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {(sh, sw)} must not exceed crop_size {(ch, cw)} in either dimension: the pixels "
                         "between two windows would get no prediction")
    return (ch, cw), (sh, sw)


@torch.no_grad()
def predict(model, images: torch.Tensor, mode: str = "whole", crop_size=None, stride=None,
            with_likelihood: bool | None = None) -> dict:
    """Run the model on a batch.

    Parameters
    ----------
    model : SegmentationModel
        Put in eval mode by the caller.
    images : Tensor (B, 3, H, W)
    mode : {"whole", "slide"}
        ``"slide"`` runs ``crop_size`` windows every ``stride`` pixels (the last window of a row/column is
        shifted to end at the border) and averages overlapping windows, as MMSegmentation's slide inference.
    crop_size, stride : int or (int, int)
        Window size and step for ``"slide"`` (stride defaults to crop_size * 2 / 3 and may not exceed it,
        so that every pixel is in some window).
    with_likelihood : bool, optional
        Also compute ``log_likelihood``; default: when the model is generative.

    Returns
    -------
    dict with ``logits`` (B, C, H, W) float32 and, if requested, ``log_likelihood`` (B, C, H, W) float32.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a batch (B, 3, H, W), got {got}; add a batch dimension with images[None]")
    generative = _is_generative(model) if with_likelihood is None else with_likelihood
    if mode == "whole":
        return _forward(model, images, generative)
    if mode != "slide":
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    (ch, cw), (sh, sw) = slide_window(crop_size, stride)
    B, _, H, W = images.shape
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    sums: dict = {}
    count = torch.zeros(1, 1, H, W, device=images.device)     # float32, as the outputs
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            crop = _forward(model, images[:, :, y1:y2, x1:x2], generative)
            for k, v in crop.items():
                if k not in sums:
                    sums[k] = v.new_zeros(B, v.shape[1], H, W)
                sums[k][:, :, y1:y2, x1:x2] += v
            count[:, :, y1:y2, x1:x2] += 1
    return {k: v / count for k, v in sums.items()}


def _collate_by_size(items):
    """A batch's ``(image, label)`` items stacked in runs of equal sizes: a list of ``(images, labels)``.

    Datasets read at their native size (ADE20K, the anomaly sets) mix image sizes within a batch, which the
    default collate cannot stack; each run is then evaluated as a smaller batch.
    """
    runs: list[tuple[tuple, list]] = []
    for item in items:
        key = (tuple(item[0].shape), tuple(item[1].shape))
        if not runs or runs[-1][0] != key:
            runs.append((key, []))
        runs[-1][1].append(item)
    return [default_collate(run) for _, run in runs]


def _batches(dataset, batch_size, num_workers, max_images, desc, progress):
    """``(images, labels)`` batches of ``dataset`` in order, with a progress bar over the loader's batches;
    ``max_images`` of them spread evenly over the dataset (a real one is sorted by city or scene)."""
    max_images = check_int("max_images", max_images, optional=True)
    if max_images is not None:
        dataset = Subset(dataset, evenly_spaced(range(len(dataset)), max_images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_by_size)
    for runs in progress_bar(loader, desc=desc, disable=not progress, leave=False):
        yield from runs


def _device(device):
    return torch.device(device) if device is not None else torch.device("cpu")


def _num_classes(model, dataset):
    n, model_n = getattr(dataset, "num_classes", None), getattr(model, "num_classes", None)
    if n is not None and model_n is not None and int(n) != int(model_n):
        raise ValueError(f"the model predicts {int(model_n)} classes but the dataset "
                         f"{getattr(dataset, 'name', type(dataset).__name__)!r} has {int(n)}; evaluate a model "
                         "trained on this dataset")
    n = n if n is not None else model_n
    if n is None:
        raise ValueError("cannot tell the number of classes: the dataset has no num_classes attribute")
    return int(n)


@torch.no_grad()
def evaluate_closed_set(model, dataset, batch_size: int = 4, device=None, mode: str = "whole", crop_size=None,
                        stride=None, num_workers: int = 0, max_images: int | None = None, ece_bins: int = 15,
                        progress: bool = True) -> dict:
    """Closed-set segmentation quality on a labelled split.

    Parameters
    ----------
    model : SegmentationModel
    dataset : Dataset of (image (3, H, W), label (H, W)) with ``num_classes`` and ``ignore_index`` (255)
    batch_size, num_workers : DataLoader settings (a batch mixing image sizes, as native-size datasets do, is
        run in pieces of equal size)
    device : torch.device or str, optional (default cpu); the model is moved there
    mode, crop_size, stride : see :func:`predict`
    max_images : int, optional
        Evaluate only this many images, spread evenly over the dataset (see
        :func:`~gmmseg_core.data.base.evenly_spaced`).
    ece_bins : int
        Bins of the expected calibration error of the softmax posterior.

    Returns
    -------
    dict: ``miou``, ``per_class_iou`` (list, NaN for classes absent from targets and predictions),
    ``pixel_acc``, ``mean_acc``, ``ece``, ``reliability`` (per-bin data), ``confusion`` (numpy (C, C)),
    ``num_images``.
    """
    device = _device(device)
    model.to(device)
    with _eval_mode(model):
        C = _num_classes(model, dataset)
        ignore = getattr(dataset, "ignore_index", 255)
        seg = SegmentationMetric(C, ignore_index=ignore, device=device)
        cal = CalibrationMetric(n_bins=ece_bins, ignore_index=ignore)
        n_images = 0
        for images, labels in _batches(dataset, batch_size, num_workers, max_images, "evaluate", progress):
            images, labels = images.to(device), labels.to(device)
            logits = predict(model, images, mode=mode, crop_size=crop_size, stride=stride,
                             with_likelihood=False)["logits"]
            seg.update(logits.max(dim=1).indices, labels)  # = argmax(1), several times faster over NCHW on CPU
            cal.update(logits.softmax(1), labels)
            n_images += images.shape[0]
    out = seg.compute()
    rel = cal.compute()
    out.update(ece=rel.pop("ece"), reliability=rel, num_images=n_images)
    return out


@torch.no_grad()
def collect_sml_statistics(model, train_dataset, batch_size: int = 4, device=None, mode: str = "whole",
                           crop_size=None, stride=None, num_workers: int = 0, max_images: int | None = None,
                           progress: bool = True) -> dict:
    """Per-class mean / std of the max logit over training pixels predicted as that class (for ``sml``).

    Returns ``{"mean": (C,), "std": (C,), "count": (C,)}`` float32 CPU tensors. Pixels labelled 255 are skipped.
    """
    device = _device(device)
    model.to(device)
    with _eval_mode(model):
        stats = SMLStatistics(_num_classes(model, train_dataset),
                              ignore_index=getattr(train_dataset, "ignore_index", 255))
        for images, labels in _batches(train_dataset, batch_size, num_workers, max_images, "sml stats", progress):
            logits = predict(model, images.to(device), mode=mode, crop_size=crop_size, stride=stride,
                             with_likelihood=False)["logits"]
            stats.update(logits, labels.to(device))
    return stats.compute()


def default_scorers(model, sml_stats=None) -> list[str]:
    """The scorers that apply: the logit scores, ``sml`` when statistics are given, ``gmm`` for a GMM model."""
    names = list(LOGIT_SCORERS)
    if sml_stats is not None:
        names.append("sml")
    if _is_generative(model):
        names.append("gmm")
    return names


@torch.no_grad()
def evaluate_anomaly(model, dataset, scorers=None, sml_stats: dict | None = None, streaming: bool = False,
                     batch_size: int = 4, device=None, mode: str = "whole", crop_size=None, stride=None,
                     num_workers: int = 0, max_images: int | None = None, num_bins: int = 2 ** 20,
                     max_curve_points: int | None = 1000, progress: bool = True) -> dict:
    """Pooled pixel-level anomaly metrics of several scorers on an anomaly split.

    Parameters
    ----------
    model : SegmentationModel
    dataset : Dataset of (image, label) with labels 0 = known, 1 = anomaly, 255 = void
    scorers : str or list of str, optional
        Names from :data:`gmmseg_core.scoring.SCORERS` (one name alone is read as ``[name]``); default
        :func:`default_scorers`. ``gmm`` needs a generative model; ``sml`` needs ``sml_stats``
        (:func:`collect_sml_statistics` on the training split).
    streaming : bool
        False: keep every valid pixel's score and compute exactly (:func:`gmmseg_core.metrics.anomaly_metrics`,
        memory O(pixels)); True: histograms (:class:`gmmseg_core.metrics.AnomalyMetric`, bounded memory).
    num_bins, max_curve_points : streaming histogram size; number of curve points returned

    Returns
    -------
    dict ``{scorer: {"auroc", "ap", "fpr95", "curves"}}``; curves are numpy arrays ``thresholds, fpr, tpr,
    precision, recall``.
    """
    scorers = scorer_names(default_scorers(model, sml_stats) if scorers is None else scorers)
    check_max_curve_points(max_curve_points)          # before the evaluation, not after it
    if "gmm" in scorers and not _is_generative(model):
        raise ValueError("scorer 'gmm' needs a generative model (head='gmm'); this model has a softmax head")
    if "sml" in scorers and sml_stats is None:
        raise ValueError("scorer 'sml' needs sml_stats: compute them with collect_sml_statistics(model, "
                         "train_dataset)")
    device = _device(device)
    model.to(device)
    with _eval_mode(model):
        generative = "gmm" in scorers
        ignore = getattr(dataset, "ignore_index", 255)
        if streaming:
            acc = {name: AnomalyMetric(num_bins=num_bins, ignore_index=ignore) for name in scorers}
        else:
            acc = {name: [] for name in scorers}
            kept_labels = []
        for images, labels in _batches(dataset, batch_size, num_workers, max_images, "anomaly", progress):
            images, labels = images.to(device), labels.to(device)
            outputs = predict(model, images, mode=mode, crop_size=crop_size, stride=stride,
                              with_likelihood=generative)
            if streaming:
                for name in scorers:
                    acc[name].update(SCORERS[name](outputs, sml_stats=sml_stats), labels)
                continue
            valid = labels != ignore
            kept_labels.append(labels[valid].to(torch.uint8).cpu())
            for name in scorers:
                acc[name].append(SCORERS[name](outputs, sml_stats=sml_stats)[valid].float().cpu())
    results = {}
    for name in scorers:
        if streaming:
            r = acc[name].compute(max_curve_points=max_curve_points)
        else:
            r = anomaly_metrics(torch.cat(acc[name]), torch.cat(kept_labels), return_curves=True,
                                max_curve_points=max_curve_points)
        results[name] = {k: r[k] for k in ("auroc", "ap", "fpr95", "curves")}
    return results


def interpolate_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to ``size`` (H, W), as ``SegmentationModel`` does."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def format_table(results: dict, keys=("auroc", "ap", "fpr95")) -> str:
    """A plain-text table of ``{row: {key: value}}`` with values in percent."""
    head = f"{'':<12}" + "".join(f"{k:>10}" for k in keys)
    lines = [head]
    for row, vals in results.items():
        cells = "".join(f"{100 * vals[k]:>10.2f}" if isinstance(vals.get(k), float) and not math.isnan(vals[k])
                        else f"{'nan':>10}" for k in keys)
        lines.append(f"{row:<12}" + cells)
    return "\n".join(lines)
