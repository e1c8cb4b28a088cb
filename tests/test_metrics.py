"""Metrics against independent references: scikit-learn and plain numpy loops."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    jaccard_score,
    roc_auc_score,
    roc_curve,
)

from gmmseg_core.metrics import (
    AnomalyMetric,
    CalibrationMetric,
    SegmentationMetric,
    anomaly_metrics,
    expected_calibration_error,
    reliability_diagram,
)

# ---------------------------------------------------------------------------------------------- segmentation


def test_segmentation_metric_matches_sklearn(rng):
    C = 5
    target = rng.integers(0, C, size=(3, 16, 16))
    target[0, :4] = 255
    target[target == 3] = 2  # class 3 never in the targets ...
    pred = rng.integers(0, C, size=(3, 16, 16))
    pred[pred == 4] = 0  # ... class 4 never predicted
    target[target == 4] = 0  # so class 4 is absent from both: NaN, left out of the mean
    metric = SegmentationMetric(C)
    for b in range(3):  # batch-wise accumulation equals one shot
        metric.update(torch.from_numpy(pred[b:b + 1]), torch.from_numpy(target[b:b + 1]))
    out = metric.compute()
    keep = target != 255
    y, p = target[keep], pred[keep]
    np.testing.assert_array_equal(out["confusion"], confusion_matrix(y, p, labels=list(range(C))))
    ref = jaccard_score(y, p, labels=[0, 1, 2, 3], average=None, zero_division=0)
    np.testing.assert_allclose(out["per_class_iou"][:4], ref, rtol=1e-12)
    assert math.isnan(out["per_class_iou"][4])
    assert out["per_class_iou"][3] == 0.0  # predicted but absent: counts as 0
    assert out["miou"] == pytest.approx(ref.mean(), rel=1e-12)
    assert out["pixel_acc"] == pytest.approx((y == p).mean(), rel=1e-12)


def test_segmentation_metric_errors_name_the_problem():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="target values must be in"):
        metric.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 5, 255]))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        SegmentationMetric(0)


def test_segmentation_metric_takes_numpy_arrays_and_numpy_num_classes():
    pred, target = np.array([[0, 1], [2, 2]]), np.array([[0, 1], [1, 255]], dtype=np.uint8)
    metric = SegmentationMetric(np.int64(3))
    assert metric.num_classes == 3 and type(metric.num_classes) is int
    metric.update(pred, target)
    ref = SegmentationMetric(3)
    ref.update(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_array_equal(metric.compute()["confusion"], ref.compute()["confusion"])
    with pytest.raises(ValueError, match="num_classes must be a positive int, got True"):
        SegmentationMetric(True)


@pytest.mark.parametrize("as_array", [np.array, torch.tensor])
def test_segmentation_metric_refuses_float_class_indices(as_array):
    metric = SegmentationMetric(3)
    with pytest.raises(TypeError, match=r"pred must hold class indices \(integers\), got dtype torch.float"):
        metric.update(as_array([0.7, 1.2]), as_array([0, 1]))
    with pytest.raises(TypeError, match=r"target must hold class indices \(integers\), got dtype torch"):
        metric.update(as_array([0, 1]), as_array([0.0, 1.0]))
    assert metric.confusion is None  # nothing was counted


def test_segmentation_metric_empty_is_nan():
    out = SegmentationMetric(2).compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pixel_acc"])


# ---------------------------------------------------------------------------------------------- anomaly, exact


def _random_anomaly_data(rng, n=20_000, ties=True):
    labels = (rng.random(n) < 0.2).astype(np.int64)
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)  # heavy ties, across classes
    labels[rng.random(n) < 0.05] = 255
    return scores, labels


def _sklearn_reference(scores, labels):
    keep = labels != 255
    s, y = scores[keep], labels[keep]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s),
            "fpr95": fpr[np.argmax(tpr >= 0.95)]}


@pytest.mark.parametrize("ties", [True, False])
def test_anomaly_metrics_exact_matches_sklearn(rng, ties):
    scores, labels = _random_anomaly_data(rng, ties=ties)
    out = anomaly_metrics(torch.from_numpy(scores).reshape(4, 50, 100), torch.from_numpy(labels).reshape(4, 50, 100))
    ref = _sklearn_reference(scores, labels)
    for k in ("auroc", "ap", "fpr95"):
        assert abs(out[k] - ref[k]) < 1e-9, k


def test_anomaly_metrics_perfect_and_reversed():
    s = torch.tensor([0.1, 0.2, 0.9, 0.8])
    y = torch.tensor([0, 0, 1, 1])
    out = anomaly_metrics(s, y)
    assert out["auroc"] == 1.0 and out["ap"] == 1.0 and out["fpr95"] == 0.0
    out = anomaly_metrics(-s, y)
    assert out["auroc"] == 0.0 and out["fpr95"] == 1.0


def test_anomaly_metrics_curves_and_errors(rng):
    scores, labels = _random_anomaly_data(rng, n=2000)
    out = anomaly_metrics(scores, labels, return_curves=True, max_curve_points=50)
    c = out["curves"]
    assert len(c["fpr"]) <= 50 and c["fpr"][-1] == 1.0 and c["tpr"][-1] == 1.0
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["thresholds"]) < 0)
    with pytest.raises(ValueError, match="need both classes"):
        anomaly_metrics(torch.rand(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be 0"):
        anomaly_metrics(torch.rand(3), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------- anomaly, streaming


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (300.0, 40.0)])
def test_streaming_anomaly_metric_matches_sklearn(rng, offset, spread):
    scores, labels = _random_anomaly_data(rng, n=60_000)
    scores = offset + spread * scores
    metric = AnomalyMetric()
    # first chunk has a narrow range: later chunks must not overflow the histogram
    order = np.argsort(np.abs(scores - np.median(scores)), kind="stable")
    for chunk in np.array_split(order, 7):
        metric.update(torch.from_numpy(scores[chunk]), torch.from_numpy(labels[chunk]))
    out = metric.compute()
    ref = _sklearn_reference(scores, labels)
    for k in ("auroc", "ap", "fpr95"):
        assert abs(out[k] - ref[k]) < 1e-3, (k, out[k], ref[k])
    assert out["n_pos"] + out["n_neg"] == int((labels != 255).sum())
    c = out["curves"]
    assert c["fpr"][-1] == 1.0 and np.all(np.diff(c["recall"]) >= 0)


def test_streaming_anomaly_metric_handles_extreme_outliers(rng):
    scores, labels = _random_anomaly_data(rng, n=20_000, ties=False)
    scores[:5] = [1e30, -1e30, np.inf, -np.inf, 1e12]
    metric = AnomalyMetric()
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    ref = _sklearn_reference(np.clip(scores, -1e300, 1e300), labels)
    out = metric.compute()
    for k in ("auroc", "ap", "fpr95"):
        assert abs(out[k] - ref[k]) < 1e-3, k


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"center": float("nan")}, "center must be a finite float or None, got nan"),
        ({"center": float("-inf")}, "center must be a finite float or None, got -inf"),
        ({"center": "0"}, "center must be a finite float or None, got '0'"),
        ({"scale": float("nan")}, "scale must be a finite float > 0 or None, got nan"),
        ({"scale": float("inf")}, "scale must be a finite float > 0 or None, got inf"),
        ({"scale": 0.0}, "scale must be a finite float > 0 or None, got 0.0"),
    ],
)
def test_streaming_transform_parameters_must_be_finite(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnomalyMetric(**kwargs)


def test_streaming_fixed_transform_accepts_numpy_floats():
    metric = AnomalyMetric(center=np.float32(0.5), scale=np.float64(0.1))
    assert type(metric.center) is float and type(metric.scale) is float
    metric.update(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert metric.compute()["auroc"] == 1.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_streaming_first_batch_of_mostly_infinite_scores(sign, rng):
    inf = float("inf")
    first = torch.tensor([sign * inf] * 4 + [0.1, 0.2, 0.3])
    first_labels = torch.tensor([1, 1, 1, 0, 0, 1, 0])
    later = torch.as_tensor(rng.normal(size=500))
    later_labels = torch.as_tensor((rng.random(500) < 0.3).astype(np.int64))
    metric = AnomalyMetric()
    metric.update(first, first_labels)
    metric.update(later, later_labels)
    exact = anomaly_metrics(torch.cat([first, later]), torch.cat([first_labels, later_labels]))
    assert math.isfinite(metric.center) and math.isfinite(metric.scale)
    streamed = metric.compute()
    for key in ("auroc", "ap", "fpr95"):
        assert streamed[key] == pytest.approx(exact[key], abs=1e-3)


def test_streaming_constant_scores_are_one_tie():
    metric = AnomalyMetric()
    metric.update(torch.full((100,), 7.0), torch.tensor([0, 1] * 50))
    out = metric.compute()
    assert out["auroc"] == pytest.approx(0.5) and out["ap"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- calibration


def _ece_reference(conf, correct, n_bins):
    ece = 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inb.any():
            ece += inb.mean() * abs(correct[inb].mean() - conf[inb].mean())
    return ece


def test_expected_calibration_error_matches_loop(rng):
    logits = torch.from_numpy(rng.normal(size=(2, 4, 8, 8)) * 3)
    labels = torch.from_numpy(rng.integers(0, 4, size=(2, 8, 8)))
    labels[0, 0] = 255
    probs = logits.softmax(1)
    ece = expected_calibration_error(probs, labels, n_bins=10)
    flat_p = probs.movedim(1, -1).reshape(-1, 4).numpy()
    flat_y = labels.reshape(-1).numpy()
    keep = flat_y != 255
    conf, pred = flat_p[keep].max(1), flat_p[keep].argmax(1)
    assert ece == pytest.approx(_ece_reference(conf, pred == flat_y[keep], 10), abs=1e-6)
    # (N, C) input gives the same value; streaming over two halves as well
    assert expected_calibration_error(torch.from_numpy(flat_p), torch.from_numpy(flat_y), n_bins=10) == \
        pytest.approx(ece, abs=1e-9)
    m = CalibrationMetric(n_bins=10)
    m.update(probs[:1], labels[:1])
    m.update(probs[1:], labels[1:])
    assert m.compute()["ece"] == pytest.approx(ece, abs=1e-9)
    diag = reliability_diagram(probs, labels, n_bins=10)
    assert diag["bin_count"].sum() == keep.sum() and len(diag["bin_edges"]) == 11


def test_perfectly_calibrated_is_zero():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0
    assert expected_calibration_error(probs, torch.tensor([1, 0])) == 1.0


def test_calibration_bins_are_closed_on_the_right_at_the_edges():
    # (lo, hi] bins: 0.2 belongs to the first of five, 0.6 to the third, in float64 as given
    assert reliability_diagram(torch.tensor([[0.2] * 5], dtype=torch.float64), torch.tensor([0]),
                               n_bins=5)["bin_count"].tolist() == [1, 0, 0, 0, 0]
    probs = torch.tensor([[0.6, 0.4], [0.61, 0.39]], dtype=torch.float64)
    # bin (0.4, 0.6]: confidence 0.6, correct; bin (0.6, 0.8]: 0.61, wrong
    assert expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=5) == pytest.approx(0.505)
    with pytest.raises(ValueError, match="probs contain NaN"):
        expected_calibration_error(torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]))


def test_calibration_refuses_logits_for_probabilities():
    logits = torch.tensor([[2.5, -1.0], [0.3, 0.1]])
    with pytest.raises(ValueError, match=r"probs must be class probabilities in \[0, 1\] \(e.g. logits.softmax\(1\)\)"):
        expected_calibration_error(logits, torch.tensor([0, 1]))


def test_bin_counts_may_be_numpy_integers_and_never_bools(rng):
    scores, labels = rng.normal(size=200), rng.integers(0, 2, size=200)
    numpy_bins, int_bins = AnomalyMetric(num_bins=np.int64(64)), AnomalyMetric(num_bins=64)
    for metric in (numpy_bins, int_bins):
        metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    assert numpy_bins.compute()["auroc"] == int_bins.compute()["auroc"]
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(50, 3))), 1)
    targets = torch.from_numpy(rng.integers(0, 3, size=50))
    assert expected_calibration_error(probs, targets, n_bins=np.int64(7)) == \
        expected_calibration_error(probs, targets, n_bins=7)
    with pytest.raises(ValueError, match="num_bins must be an int >= 2, got True"):
        AnomalyMetric(num_bins=True)
    with pytest.raises(ValueError, match="n_bins must be a positive int, got True"):
        CalibrationMetric(n_bins=True)


@pytest.mark.parametrize("max_points", [0, 1, -1, 2.5, True])
def test_curves_need_at_least_their_two_end_points(rng, max_points):
    scores, labels = torch.from_numpy(rng.normal(size=100)), torch.from_numpy(rng.integers(0, 2, size=100))
    with pytest.raises(ValueError, match=rf"max_curve_points must be None or an int >= 2, got {max_points!r}"):
        anomaly_metrics(scores, labels, return_curves=True, max_curve_points=max_points)
    metric = AnomalyMetric()
    metric.update(scores, labels)
    with pytest.raises(ValueError, match="max_curve_points must be None or an int >= 2"):
        metric.compute(max_curve_points=max_points)
    curves = anomaly_metrics(scores, labels, return_curves=True, max_curve_points=np.int64(2))["curves"]
    assert len(curves["fpr"]) == 2 and curves["fpr"][-1] == 1.0 and curves["tpr"][-1] == 1.0


def test_segmentation_mean_accuracy_is_the_mean_recall_of_the_target_classes(rng):
    C = 4
    target = rng.integers(0, 3, size=500)                    # class 3 never a target ...
    pred = np.where(rng.random(500) < 0.6, target, rng.integers(0, C, size=500))   # ... but predicted
    metric = SegmentationMetric(C)
    metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    recalls = [(pred[target == c] == c).mean() for c in range(3)]
    assert metric.compute()["mean_acc"] == pytest.approx(np.mean(recalls), rel=1e-12)


def test_fpr95_at_a_threshold_whose_tpr_is_exactly_095():
    # 19 of 20 anomalies score 10, above every known pixel: TPR 0.95 is reached with no false positive
    scores = torch.tensor([10.0] * 19 + [0.0] + [5.0] * 3 + [-1.0] * 7)
    labels = torch.tensor([1] * 20 + [0] * 10)
    assert _sklearn_reference(scores.numpy(), labels.numpy())["fpr95"] == 0.0
    assert anomaly_metrics(scores, labels)["fpr95"] == 0.0


def test_streaming_scores_in_distinct_bins_rank_exactly():
    # one score per bin, the end bins included: the histogram keeps their order, so it equals the exact metrics
    num_bins = 8
    t = -AnomalyMetric.T_MAX + (torch.arange(num_bins, dtype=torch.float64) + 0.5) * 2 * AnomalyMetric.T_MAX / num_bins
    scores, labels = torch.sinh(t), torch.tensor([1, 0, 0, 1, 0, 1, 1, 0])
    metric = AnomalyMetric(num_bins=num_bins, center=0.0, scale=1.0)
    metric.update(scores, labels)
    exact = anomaly_metrics(scores, labels)
    out = metric.compute()
    for key in ("auroc", "ap", "fpr95"):
        assert out[key] == pytest.approx(exact[key], abs=1e-12), key
    assert out["curves"]["fpr"].size == num_bins


def test_streaming_curve_thresholds_reproduce_the_curve(rng):
    # flagging every score >= a returned threshold gives that threshold's TPR and FPR
    scores = 50.0 + 2.0 * rng.normal(size=3000)
    labels = (rng.random(3000) < 0.3).astype(np.int64)
    metric = AnomalyMetric(num_bins=4096)
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    c = metric.compute(max_curve_points=None)["curves"]
    pos, neg = labels == 1, labels == 0
    for i in range(0, c["thresholds"].size, 97):
        flagged = scores >= c["thresholds"][i]
        assert (flagged & pos).sum() / pos.sum() == pytest.approx(c["tpr"][i], abs=1e-12)
        assert (flagged & neg).sum() / neg.sum() == pytest.approx(c["fpr"][i], abs=1e-12)


def _assert_streamed_matches_sklearn(scores, labels):
    """One ``AnomalyMetric`` update of numpy ``scores`` / ``labels``: AUROC, AP and FPR95 within 1e-3 of sklearn."""
    metric = AnomalyMetric()
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    out, ref = metric.compute(), _sklearn_reference(scores, labels)
    for key in ("auroc", "ap", "fpr95"):
        assert out[key] == pytest.approx(ref[key], abs=1e-3), key


def test_streaming_anomaly_metric_far_from_the_origin_matches_sklearn(rng):
    # a spread of 1e-2 around 1e6: the transform centred on 0 would put every score into a handful of bins
    scores, labels = _random_anomaly_data(rng, n=20_000, ties=False)
    scores = 1e6 + 1e-2 * scores
    _assert_streamed_matches_sklearn(scores, labels)


def test_streaming_update_larger_than_a_slice_counts_every_pixel(rng):
    scores, labels = _random_anomaly_data(rng, n=1000, ties=False)
    sliced = AnomalyMetric(center=0.0, scale=1.0)
    sliced.SUBCHUNK = 64                                    # many slices per update
    sliced.update(torch.from_numpy(scores), torch.from_numpy(labels))
    whole = AnomalyMetric(center=0.0, scale=1.0)
    whole.update(torch.from_numpy(scores), torch.from_numpy(labels))
    a, b = sliced.compute(), whole.compute()
    assert a["n_pos"] + a["n_neg"] == int((labels != 255).sum())
    assert all(a[k] == b[k] for k in ("auroc", "ap", "fpr95", "n_pos", "n_neg"))


def test_nan_scores_are_refused_by_both_anomaly_paths():
    scores, labels = torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="scores contain NaN"):
        anomaly_metrics(scores, labels)
    with pytest.raises(ValueError, match="scores contain NaN"):
        AnomalyMetric().update(scores, labels)


def test_streaming_scale_of_a_first_batch_with_no_interquartile_range(rng):
    # most scores tied at 1000: the interquartile range is 0, so the scale falls back to the standard deviation
    n = 20_000
    labels = (rng.random(n) < 0.5).astype(np.int64)
    scores = np.full(n, 1000.0)
    spread = rng.random(n) < 0.2
    scores[spread] += 1e-3 * (rng.normal(size=spread.sum()) + 1.5 * labels[spread])
    _assert_streamed_matches_sklearn(scores, labels)


def test_reliability_diagram_bins_against_a_loop(rng):
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(400, 3)) * 2), 1)
    labels = torch.from_numpy(rng.integers(0, 3, size=400))
    diag = reliability_diagram(probs, labels, n_bins=5)
    conf, pred = probs.max(1)
    conf, correct = conf.numpy(), (pred == labels).numpy()
    b = np.clip(np.ceil(conf * 5).astype(int) - 1, 0, 4)
    for i in range(5):
        inb = b == i
        assert diag["bin_count"][i] == inb.sum()
        if inb.any():
            assert diag["bin_confidence"][i] == pytest.approx(conf[inb].mean(), rel=1e-12)
            assert diag["bin_accuracy"][i] == pytest.approx(correct[inb].mean(), rel=1e-12)


def test_segmentation_metric_refuses_predictions_outside_the_classes():
    with pytest.raises(ValueError, match=r"pred values must be in \[0, 3\), got range \[0, 3\]"):
        SegmentationMetric(3).update(torch.tensor([0, 3]), torch.tensor([0, 1]))
