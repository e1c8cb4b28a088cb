"""Anomaly scorers against direct numpy / torch.distributions computations."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from gmmseg_core.scoring import SCORERS, SMLStatistics, compute_scores, fit_sml_statistics


@pytest.fixture
def outputs(rng):
    logits = torch.from_numpy(rng.normal(size=(2, 4, 5, 6)) * 2).float()
    return {"logits": logits, "log_likelihood": logits - 100.0}


def test_logit_scorers_match_numpy(outputs):
    z = outputs["logits"].double().numpy()
    p = softmax(z, axis=1)
    expected = {
        "msp": 1 - p.max(1),
        "max_logit": -z.max(1),
        "energy": -logsumexp(z, axis=1),
        "entropy": torch.distributions.Categorical(probs=torch.from_numpy(p).movedim(1, -1)).entropy().numpy(),
        "gmm": -(z - 100.0).max(1),
    }
    for name, ref in expected.items():
        got = SCORERS[name](outputs)
        assert got.shape == (2, 5, 6)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_energy_temperature(outputs):
    z = outputs["logits"].double().numpy()
    got = SCORERS["energy"](outputs, temperature=2.0).numpy()
    np.testing.assert_allclose(got, -2.0 * logsumexp(z / 2.0, axis=1), rtol=1e-5)


def test_higher_is_more_anomalous_on_a_flat_posterior():
    confident = torch.tensor([10.0, 0.0, 0.0]).view(1, 3, 1, 1)
    flat = torch.zeros(1, 3, 1, 1)
    for name in ("msp", "entropy", "max_logit", "energy"):
        assert SCORERS[name]({"logits": flat}) > SCORERS[name]({"logits": confident}), name


def test_msp_keeps_its_ranking_when_the_top_logit_leads_far():
    # 1 - max softmax would round to exactly 0 for all these pixels in float32
    gap = torch.linspace(20.0, 40.0, 50)
    logits = torch.stack([gap, torch.zeros(50), torch.zeros(50)]).reshape(1, 3, 1, 50)
    score = SCORERS["msp"]({"logits": logits})[0, 0]
    assert (score > 0).all() and (score.diff() < 0).all()
    torch.testing.assert_close(score, 2 * torch.exp(-gap.double()).float() / (1 + 2 * torch.exp(-gap.double())).float())


def test_msp_of_large_logits_keeps_its_precision():
    for base in (-1e4, -1e5, -3e5):                  # GMM log-likelihood logits are large and negative
        z = torch.tensor([base, base - 1.0]).view(1, 2, 1, 1)
        assert float(SCORERS["msp"]({"logits": z})) == pytest.approx(1 / (1 + np.e), abs=1e-6)


def test_entropy_of_a_class_with_logit_minus_inf():
    z = torch.tensor([1.0, 2.0, float("-inf")]).view(1, 3, 1, 1)
    got = SCORERS["entropy"]({"logits": z})
    np.testing.assert_allclose(got.item(), SCORERS["entropy"]({"logits": z[:, :2]}).item(), rtol=1e-6)
    assert torch.isnan(SCORERS["entropy"]({"logits": torch.full((1, 3, 1, 1), float("nan"))})).all()


def test_gmm_scorer_needs_log_likelihood(outputs):
    with pytest.raises(ValueError, match="needs outputs\\['log_likelihood'\\]"):
        SCORERS["gmm"]({"logits": outputs["logits"]})
    with pytest.raises(ValueError, match="unknown scorer 'foo'"):
        compute_scores(outputs, ["msp", "foo"])


def test_sml_statistics_and_score(rng):
    logits = torch.from_numpy(rng.normal(size=(3, 3, 8, 8))).float()
    labels = torch.zeros(3, 8, 8, dtype=torch.long)
    labels[0, 0] = 255
    stats = fit_sml_statistics([(logits[:2], labels[:2]), (logits[2:], labels[2:])])
    # reference: per predicted class mean / std of the max logit over non-ignored pixels
    m, k = logits.max(1)
    keep = labels != 255
    m, k = m[keep].double().numpy(), k[keep].numpy()
    for c in range(3):
        np.testing.assert_allclose(stats["mean"][c], m[k == c].mean(), rtol=1e-5)
        np.testing.assert_allclose(stats["std"][c], m[k == c].std(), rtol=1e-4)
    score = SCORERS["sml"]({"logits": logits}, sml_stats=stats)
    mm, kk = logits.max(1)
    np.testing.assert_allclose(score.numpy(), (-(mm - stats["mean"][kk]) / stats["std"][kk]).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="needs sml_stats"):
        SCORERS["sml"]({"logits": logits})


def test_sml_unseen_class_falls_back_to_pooled_stats():
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # class 0 always predicted
    stats = SMLStatistics(3)
    stats.update(logits)
    out = stats.compute()
    assert out["count"].tolist() == [4.0, 0.0, 0.0]
    assert torch.isfinite(out["std"]).all() and out["mean"][1] == out["mean"][0]


def test_one_scorer_name_as_a_string_and_numpy_class_counts(outputs):
    assert compute_scores(outputs, "msp").keys() == {"msp"}
    with pytest.raises(ValueError, match="unknown scorer 'mps'"):
        compute_scores(outputs, "mps")
    assert SMLStatistics(np.int64(4)).num_classes == 4
    with pytest.raises(ValueError, match="num_classes must be a positive int, got True"):
        SMLStatistics(True)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), "1"])
def test_energy_refuses_a_temperature_that_is_not_a_finite_positive_number(outputs, temperature):
    with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {temperature!r}"):
        SCORERS["energy"](outputs, temperature=temperature)


def test_sml_statistics_take_numpy_labels_and_name_labels_of_another_shape(rng):
    logits = torch.from_numpy(rng.normal(size=(2, 3, 4, 5))).float()
    labels = rng.integers(0, 3, size=(2, 4, 5))
    labels[0, 0] = 255
    from_numpy = fit_sml_statistics([(logits, labels)])
    from_tensor = fit_sml_statistics([(logits, torch.from_numpy(labels))])
    for key in ("mean", "std", "count"):
        torch.testing.assert_close(from_numpy[key], from_tensor[key])
    with pytest.raises(ValueError, match=r"labels must be \(2, 4, 5\) for logits of shape \(2, 3, 4, 5\), got "
                                         r"\(2, 1, 4, 5\)"):
        SMLStatistics(3).update(logits, torch.zeros(2, 1, 4, 5, dtype=torch.long))


def test_msp_of_an_infinite_top_logit_is_zero():
    # a class whose logit is +inf takes all the probability: certain, not undefined
    z = torch.tensor([float("inf"), 0.0, -3.0]).view(1, 3, 1, 1)
    assert float(SCORERS["msp"]({"logits": z})) == 0.0


def test_sml_class_predicted_once_takes_the_pooled_std():
    # one pixel gives no spread: such a class is standardised by the spread of all pixels
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([1.0, 2.0, 4.0, -5.0])          # pixel 3 is predicted as class 1 (max 0)
    stats = fit_sml_statistics([logits])
    maxima = np.array([1.0, 2.0, 4.0, 0.0])
    assert stats["count"].tolist() == [3.0, 1.0]
    np.testing.assert_allclose(stats["std"][1], maxima.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["std"][0], maxima[:3].std(), rtol=1e-6)


def test_sml_unseen_class_takes_the_pooled_mean_and_std():
    logits = torch.zeros(1, 3, 1, 5)
    logits[0, 0, 0, :3] = torch.tensor([1.0, 2.0, 6.0])            # class 0: three pixels
    logits[0, 1, 0, 3:] = torch.tensor([10.0, 11.0])               # class 1: two pixels; class 2 never
    stats = fit_sml_statistics([logits])
    maxima = np.array([1.0, 2.0, 6.0, 10.0, 11.0])
    np.testing.assert_allclose(stats["mean"][2], maxima.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["std"][2], maxima.std(), rtol=1e-6)


def test_sml_std_is_floored_for_a_constant_class():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0] = 3.0                                             # class 0 always predicted, max logit 3
    stats = fit_sml_statistics([logits])
    assert float(stats["std"][0]) == pytest.approx(1e-6)
    assert torch.isfinite(SCORERS["sml"]({"logits": logits}, sml_stats=stats)).all()


def test_sml_statistics_skip_their_own_ignore_index():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 0, 0] = torch.tensor([1.0, 2.0, 9.0])
    labels = torch.tensor([[[0, 255, 7]]])                           # 7 is ignored, 255 is not
    stats = fit_sml_statistics([(logits, labels)], ignore_index=7)
    assert stats["count"].tolist() == [2.0, 0.0]
    assert float(stats["mean"][0]) == pytest.approx(1.5)


def test_energy_and_sml_refuse_bad_parameters(outputs):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        SCORERS["energy"](outputs, temperature=0)
    stats = {"mean": torch.zeros(2), "std": torch.ones(2)}
    with pytest.raises(ValueError, match="sml_stats has 2 classes but the logits have 4"):
        SCORERS["sml"](outputs, sml_stats=stats)
