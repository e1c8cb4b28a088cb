"""Inference and evaluations, with stand-in models whose right answers are known."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmmseg_core.evaluate import (
    collect_sml_statistics,
    default_scorers,
    evaluate_anomaly,
    evaluate_closed_set,
    format_table,
    predict,
)
from gmmseg_core.metrics import SegmentationMetric, anomaly_metrics
from gmmseg_core.scoring import SCORERS, fit_sml_statistics


class LabelDataset(torch.utils.data.Dataset):
    """Images whose channel 0 holds the label (so a model can 'see' it); labels with some 255."""

    def __init__(self, n=5, num_classes=3, size=12, anomaly=False, seed=0, jitter=0.1):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2 if anomaly else num_classes, (n, size, size), generator=g)
        self.labels[:, 0, :3] = 255
        self.noise = torch.randn(n, 3, size, size, generator=g)
        self.num_classes = 2 if anomaly else num_classes
        self.ignore_index = 255
        self.jitter = jitter

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.noise[i].clone()
        image[0] = self.labels[i].clamp(max=self.num_classes - 1).float() + self.jitter * self.noise[i, 0]
        return image, self.labels[i]


class ChannelModel(nn.Module):
    """logits_c = -scale * |x_0 - c| (pixel-wise, so translation equivariant); generative on request."""

    def __init__(self, num_classes=3, generative=False):
        super().__init__()
        self.num_classes = num_classes
        self.is_generative = generative
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, images):
        c = torch.arange(self.num_classes, dtype=images.dtype).view(1, -1, 1, 1)
        return -self.scale * (images[:, :1] - c).abs()

    def class_log_likelihood(self, images):
        return self(images) - 50.0 * images[:, 1:2].abs()


class WindowMeanModel(nn.Module):
    """Output = the mean of the input window, everywhere: makes the window layout visible."""

    is_generative = False

    def forward(self, images):
        return images.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 2, *images.shape[-2:]).contiguous()


def _slide_reference(model, img, crop, stride):
    """MMSegmentation slide_inference, written as plain loops."""
    _, _, H, W = img.shape
    out = torch.zeros(img.shape[0], 2, H, W)
    count = torch.zeros(1, 1, H, W)
    h_grids = max(H - crop + stride - 1, 0) // stride + 1
    w_grids = max(W - crop + stride - 1, 0) // stride + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def test_slide_inference_matches_the_mmseg_recipe():
    img = torch.randn(2, 3, 13, 17)
    model = WindowMeanModel()
    got = predict(model, img, mode="slide", crop_size=6, stride=4)["logits"]
    torch.testing.assert_close(got, _slide_reference(model, img, 6, 4))
    # a pixel-wise model gives the same answer whole or slid
    pix = ChannelModel(generative=True)
    whole = predict(pix, img)
    slid = predict(pix, img, mode="slide", crop_size=(5, 7), stride=(3, 4))
    torch.testing.assert_close(whole["logits"], slid["logits"])
    torch.testing.assert_close(whole["log_likelihood"], slid["log_likelihood"])
    with pytest.raises(ValueError, match="crop_size is required"):
        predict(pix, img, mode="slide")
    with pytest.raises(ValueError, match="mode must be 'whole' or 'slide'"):
        predict(pix, img, mode="tiles")


@pytest.mark.parametrize("kw", [dict(crop_size=True), dict(crop_size=2.5), dict(crop_size=(2.7, 3)),
                                dict(crop_size="4"), dict(crop_size=(4, 4, 4)), dict(crop_size=4, stride=True)])
def test_slide_window_sizes_must_be_positive_ints(kw):
    name = "stride" if "stride" in kw else "crop_size"
    with pytest.raises(ValueError, match=rf"^{name} must be a positive int or a \(height, width\) pair of positive "
                                         rf"ints, got {re.escape(repr(kw[name]))}$"):
        predict(ChannelModel(), torch.randn(1, 3, 10, 10), mode="slide", **kw)


def test_slide_window_sizes_may_be_numpy_integers():
    img = torch.randn(1, 3, 10, 10)
    got = predict(WindowMeanModel(), img, mode="slide", crop_size=np.int64(6), stride=np.array([4, 3]))["logits"]
    torch.testing.assert_close(got, predict(WindowMeanModel(), img, mode="slide", crop_size=6, stride=(4, 3))["logits"])


def test_slide_inference_refuses_gaps_and_returns_float32():
    img = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    pix = ChannelModel()
    # a stride beyond the window would leave pixels that no window covers (they used to come out NaN)
    with pytest.raises(ValueError, match=r"stride \(6, 6\) must not exceed crop_size \(4, 4\)"):
        predict(pix, img, mode="slide", crop_size=4, stride=6)
    with pytest.raises(ValueError, match=r"stride \(2, 5\) must not exceed crop_size \(4, 4\)"):
        predict(pix, img, mode="slide", crop_size=4, stride=(2, 5))
    slid = predict(pix, img, mode="slide", crop_size=4, stride=4)["logits"]
    assert slid.dtype == torch.float32 and torch.isfinite(slid).all()
    torch.testing.assert_close(slid, predict(pix, img)["logits"])


def test_closed_set_perfect_model_and_reference():
    ds = LabelDataset()
    out = evaluate_closed_set(ChannelModel(), ds, batch_size=2, progress=False)
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0 and out["num_images"] == 5
    # a noisier model: the metric equals SegmentationMetric over the stacked predictions
    model = ChannelModel()
    with torch.no_grad():
        model.scale.fill_(0.5)
    noisy = LabelDataset(seed=1, jitter=1.0)
    out = evaluate_closed_set(model, noisy, batch_size=3, progress=False)
    ref = SegmentationMetric(3)
    images = torch.stack([noisy[i][0] for i in range(5)])
    ref.update(model(images).argmax(1), noisy.labels)
    expected = ref.compute()
    assert out["miou"] == pytest.approx(expected["miou"]) and out["miou"] < 1
    np.testing.assert_array_equal(out["confusion"], expected["confusion"])
    assert 0 <= out["ece"] <= 1 and out["reliability"]["bin_count"].sum() == (noisy.labels != 255).sum()


class MixedSizeDataset(LabelDataset):
    """LabelDataset whose odd items are cropped: a batch mixes image sizes, as native-size datasets do."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return (image[:, :9, :7], label[:9, :7]) if i % 2 else (image, label)


def test_evaluation_runs_batches_that_mix_image_sizes():
    ds = MixedSizeDataset(seed=2, jitter=1.0)
    model = ChannelModel(generative=True)
    with torch.no_grad():
        model.scale.fill_(0.5)
    batched = evaluate_closed_set(model, ds, batch_size=4, progress=False)
    single = evaluate_closed_set(model, ds, batch_size=1, progress=False)
    np.testing.assert_array_equal(batched["confusion"], single["confusion"])
    assert batched["num_images"] == 5 and batched["ece"] == pytest.approx(single["ece"])
    anomaly = MixedSizeDataset(n=4, anomaly=True)
    model = ChannelModel(num_classes=2, generative=True)
    a = evaluate_anomaly(model, anomaly, scorers=["msp", "gmm"], batch_size=3, progress=False)
    b = evaluate_anomaly(model, anomaly, scorers=["msp", "gmm"], batch_size=1, progress=False)
    assert {k: a[k]["auroc"] for k in a} == pytest.approx({k: b[k]["auroc"] for k in b})


def test_anomaly_evaluation_matches_direct_metrics():
    ds = LabelDataset(n=4, anomaly=True)
    model = ChannelModel(num_classes=2, generative=True)
    images = torch.stack([ds[i][0] for i in range(4)])
    outputs = {"logits": model(images), "log_likelihood": model.class_log_likelihood(images)}
    stats = fit_sml_statistics([outputs["logits"]])
    scorers = ["msp", "energy", "sml", "gmm"]
    exact = evaluate_anomaly(model, ds, scorers=scorers, sml_stats=stats, batch_size=3, progress=False)
    stream = evaluate_anomaly(model, ds, scorers=scorers, sml_stats=stats, batch_size=3, streaming=True,
                              progress=False)
    for name in scorers:
        ref = anomaly_metrics(SCORERS[name](outputs, sml_stats=stats), ds.labels)
        for k in ("auroc", "ap", "fpr95"):
            assert exact[name][k] == pytest.approx(ref[k], abs=1e-9), (name, k)
            assert stream[name][k] == pytest.approx(ref[k], abs=1e-3), (name, k)
        assert set(exact[name]["curves"]) >= {"fpr", "tpr", "precision", "recall"}
    assert "auroc" in format_table(exact)


def test_anomaly_evaluation_reads_one_scorer_name_as_a_list():
    ds = LabelDataset(n=2, anomaly=True)
    model = ChannelModel(num_classes=2)
    one = evaluate_anomaly(model, ds, scorers="msp", progress=False)
    listed = evaluate_anomaly(model, ds, scorers=["msp"], progress=False)
    assert list(one) == ["msp"]
    for k in ("auroc", "ap", "fpr95"):
        assert one["msp"][k] == listed["msp"][k], k
    with pytest.raises(ValueError, match="unknown scorer 'bogus'"):
        evaluate_anomaly(model, ds, scorers="bogus", progress=False)


class ExplodingModel(torch.nn.Module):
    """A model that must not be run: its arguments are wrong before any image is read."""

    num_classes = 2
    is_generative = False

    def forward(self, images):
        raise AssertionError("the arguments should have been refused before the evaluation")


def test_anomaly_evaluation_errors_and_defaults():
    ds = LabelDataset(n=2, anomaly=True)
    softmax_model = ChannelModel(num_classes=2)
    with pytest.raises(ValueError, match="needs a generative model"):
        evaluate_anomaly(softmax_model, ds, scorers=["gmm"], progress=False)
    with pytest.raises(ValueError, match="needs sml_stats"):
        evaluate_anomaly(softmax_model, ds, scorers=["sml"], progress=False)
    with pytest.raises(ValueError, match="max_curve_points must be None or an int >= 2, got 1"):
        evaluate_anomaly(ExplodingModel(), ds, scorers=["msp"], max_curve_points=1, progress=False)
    assert default_scorers(softmax_model) == ["msp", "max_logit", "energy", "entropy"]
    assert default_scorers(ChannelModel(generative=True), sml_stats={})[-2:] == ["sml", "gmm"]


def test_collect_sml_statistics_equals_fit_on_logits():
    ds = LabelDataset(n=4)
    model = ChannelModel()
    stats = collect_sml_statistics(model, ds, batch_size=3, progress=False)
    images = torch.stack([ds[i][0] for i in range(4)])
    ref = fit_sml_statistics([(model(images).detach(), ds.labels)])
    torch.testing.assert_close(stats["mean"], ref["mean"])
    torch.testing.assert_close(stats["std"], ref["std"])


def test_real_model_on_the_scenes_anomaly_split():
    from gmmseg_core.data import build_dataset
    from gmmseg_core.models import build_model

    train_ds = build_dataset("scenes", "train", image_size=32, num_images=2)
    model = build_model("fcn", "gmm", num_classes=train_ds.num_classes, width=4,
                        head_kwargs=dict(embed_dim=4, num_components=2))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = predict(model, x)  # one backbone pass for both maps: equal to the model's own two methods
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(x))
        torch.testing.assert_close(out["log_likelihood"], model.class_log_likelihood(x))
    anomaly = build_dataset("scenes", "anomaly", image_size=32, num_images=2)
    stats = collect_sml_statistics(model, train_ds, progress=False)
    out = evaluate_anomaly(model, anomaly, sml_stats=stats, progress=False)
    assert set(out) == {"msp", "max_logit", "energy", "entropy", "sml", "gmm"}
    for r in out.values():
        assert 0 <= r["auroc"] <= 1 and 0 <= r["ap"] <= 1 and 0 <= r["fpr95"] <= 1


def test_input_errors_name_what_was_expected():
    from gmmseg_core.data import build_dataset
    from gmmseg_core.models import build_model

    ds = build_dataset("scenes", "val", image_size=32, num_images=2)
    model = build_model("fcn", "softmax", num_classes=ds.num_classes - 1, width=4).eval()
    with pytest.raises(ValueError, match=rf"the model predicts {ds.num_classes - 1} classes but the dataset "
                                         rf"'scenes' has {ds.num_classes}"):
        evaluate_closed_set(model, ds, progress=False)
    with pytest.raises(ValueError, match=r"images must be a batch \(B, 3, H, W\), got \(3, 32, 32\)"):
        predict(model, torch.randn(3, 32, 32))


def test_slide_inference_defaults_to_a_stride_of_two_thirds_of_the_window():
    img = torch.randn(1, 3, 13, 17)
    model = WindowMeanModel()
    default = predict(model, img, mode="slide", crop_size=6)["logits"]
    torch.testing.assert_close(default, _slide_reference(model, img, 6, 4))


def test_evaluations_leave_the_model_in_the_mode_they_found_it():
    closed, anomaly = LabelDataset(n=2), LabelDataset(n=2, anomaly=True)
    model = ChannelModel(generative=True)
    evaluate_closed_set(model.train(), closed, progress=False)
    assert model.training
    collect_sml_statistics(model, closed, progress=False)
    assert model.training
    two = ChannelModel(num_classes=2).train()
    evaluate_anomaly(two, anomaly, scorers=["msp"], progress=False)
    assert two.training
    evaluate_closed_set(model.eval(), closed, progress=False)
    assert not model.training


def test_max_images_evaluates_images_spread_evenly_over_the_dataset():
    ds = LabelDataset(n=5, seed=3, jitter=1.0)
    model = ChannelModel()
    with torch.no_grad():
        model.scale.fill_(0.5)
    spread = evaluate_closed_set(model, ds, max_images=2, progress=False)
    assert spread["num_images"] == 2
    ref = SegmentationMetric(3)
    ref.update(model(torch.stack([ds[i][0] for i in (0, 2)])).argmax(1), ds.labels[[0, 2]])    # floor(i * 5 / 2)
    np.testing.assert_array_equal(spread["confusion"], ref.compute()["confusion"])
    assert evaluate_closed_set(model, ds, max_images=9, progress=False)["num_images"] == 5


@pytest.mark.parametrize("max_images", [0, -1, 2.7, True])
def test_max_images_must_be_none_or_a_positive_int(max_images):
    ds, model = LabelDataset(n=5), ChannelModel(generative=True)
    message = f"^max_images must be None or a positive int, got {re.escape(repr(max_images))}$"
    with pytest.raises(ValueError, match=message):
        evaluate_closed_set(model, ds, max_images=max_images, progress=False)
    with pytest.raises(ValueError, match=message):
        collect_sml_statistics(model, ds, max_images=max_images, progress=False)


def test_format_table_prints_percent_and_nan():
    table = format_table({"gmm": {"auroc": 0.91234, "ap": float("nan"), "fpr95": 0.05}})
    header, row = table.splitlines()
    assert header.split() == ["auroc", "ap", "fpr95"]
    assert row.split() == ["gmm", "91.23", "nan", "5.00"]


class _FailingDataset(torch.utils.data.Dataset):
    """Two images, the second of which cannot be read."""

    def __init__(self, anomaly=False):
        self.good = LabelDataset(n=1, anomaly=anomaly)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 1:
            raise OSError("unreadable image")
        return self.good[i]


@pytest.mark.parametrize("which", ["closed", "sml", "anomaly"])
def test_an_evaluation_that_fails_leaves_the_model_in_training_mode(which):
    model = (ChannelModel(num_classes=2) if which == "anomaly" else ChannelModel()).train()
    run = {"closed": lambda: evaluate_closed_set(model, _FailingDataset(), batch_size=1, progress=False),
           "sml": lambda: collect_sml_statistics(model, _FailingDataset(), batch_size=1, progress=False),
           "anomaly": lambda: evaluate_anomaly(model, _FailingDataset(anomaly=True), scorers=["msp"], batch_size=1,
                                               progress=False)}[which]
    with pytest.raises(OSError, match="unreadable image"):
        run()
    assert model.training


def test_gmm_score_of_the_official_variant_reads_the_densities_before_the_class_layernorm():
    from torch.distributions import Independent, Normal

    from gmmseg_core.models import build_model

    model = build_model("fcn", "gmm", num_classes=3, width=4,
                        head_kwargs=dict(variant="official", embed_dim=4, num_components=2)).eval()
    head = model.head
    with torch.no_grad():
        head.class_normalizer.weight.uniform_(0.5, 2.0)
        head.class_normalizer.bias.normal_()
        x = torch.randn(1, 3, 32, 32)
        out = predict(model, x)
        emb = head.embedding(model.backbone(x))                                   # (1, h, w, D)
        best = torch.stack([Independent(Normal(head.means[c], head.variances[c].sqrt()), 1)
                            .log_prob(emb[..., None, :]).amax(-1) for c in range(3)], 1)   # (1, C, h, w)
        ref = F.interpolate(best, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["log_likelihood"], ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(SCORERS["gmm"](out), -ref.amax(1), rtol=1e-5, atol=1e-4)
    assert float((out["logits"] - out["log_likelihood"]).abs().max()) > 1.0     # the logits are normalised
