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


INF = float("inf")


def _pixels(rows, dtype=torch.float32):
    """Logits (1, C, 1, P) of P pixels given as P rows of C values."""
    return torch.tensor(rows, dtype=torch.float64).T.reshape(1, len(rows[0]), 1, len(rows)).to(dtype)


def _softmax_scores_float64(rows):
    """msp and entropy of finite float64 logits (P, C), the references for the limits."""
    p = softmax(np.asarray(rows, dtype=np.float64), axis=1)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return 1 - p.max(1), -plogp.sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_msp_and_entropy_of_infinite_logits_are_the_limits_of_large_finite_ones(dtype):
    t = 1e4                                                        # stands for +inf in the float64 reference
    limits = {                                                     # logits with infinities: their finite stand-in
        (INF, 0.0, -3.0, 1.0): (t, 0.0, -3.0, 1.0),                # one class takes all the probability
        (INF, INF, 0.0, -INF): (t, t, 0.0, -t),                    # two share it
        (INF, INF, INF, INF): (t, t, t, t),
        (-INF, -INF, -INF, -INF): (-t, -t, -t, -t),                # no evidence at all: the uniform posterior
        (-INF, 2.0, -INF, 1.0): (-t, 2.0, -t, 1.0),
    }
    outputs = {"logits": _pixels(list(limits), dtype)}
    ref_msp, ref_entropy = _softmax_scores_float64(list(limits.values()))
    np.testing.assert_allclose(SCORERS["msp"](outputs)[0, 0].numpy(), ref_msp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(SCORERS["entropy"](outputs)[0, 0].numpy(), ref_entropy, rtol=1e-6, atol=1e-7)


def test_evidence_scores_of_infinite_logits_are_infinite_with_the_right_sign():
    rows = [(INF, 0.0, -3.0), (INF, INF, -INF), (-INF, -INF, -INF), (-INF, 1.0, -INF)]
    outputs = {"logits": _pixels(rows), "log_likelihood": _pixels(rows)}
    stats = {"mean": torch.tensor([1.0, -2.0, 0.5]), "std": torch.tensor([2.0, 1.0, 3.0])}
    for name in ("max_logit", "energy", "sml", "gmm"):
        got = SCORERS[name](outputs, sml_stats=stats)[0, 0].tolist()
        assert got[:3] == [-INF, -INF, INF] and np.isfinite(got[3]), name
    assert SCORERS["sml"](outputs, sml_stats=stats)[0, 0, 3] == -3.0   # - (1 - (-2)) / 1


def test_nan_logits_still_give_nan():
    outputs = {"logits": _pixels([(float("nan"), 1.0, INF), (-INF, float("nan"), -INF)])}
    for name in ("msp", "entropy", "max_logit", "energy"):
        assert torch.isnan(SCORERS[name](outputs)).all(), name


def test_energy_of_large_logits_at_a_low_temperature_is_finite():
    rows = [(3e38, 0.0, -1.0), (-3e38, -3e38, -3e38), (1e30, 1e30 * (1 - 2**-20), 0.0), (1.0, 2.0, 0.5)]
    for temperature in (0.5, 1e-3, 1.0, 3.0):
        got = SCORERS["energy"]({"logits": _pixels(rows)}, temperature=temperature)[0, 0].double().numpy()
        z = _pixels(rows).double().numpy()[0, :, 0].T               # the float32 values, in float64
        ref = -temperature * logsumexp(z / temperature, axis=1)
        np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_sml_of_a_max_logit_far_from_its_class_mean_is_finite():
    logits = _pixels([(3e38, 0.0), (-3e38, -3.1e38)])
    stats = {"mean": torch.tensor([-3e38, 0.0]), "std": torch.tensor([4.0, 1.0])}
    got = SCORERS["sml"]({"logits": logits}, sml_stats=stats)[0, 0].tolist()
    assert got == pytest.approx([-1.5e38, 0.0], rel=1e-6)
    stats["std"][0] = 1.0                                          # -6e38 is beyond float32's range
    assert SCORERS["sml"]({"logits": logits}, sml_stats=stats)[0, 0, 0] == -INF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_score_as_their_float64_values(dtype):
    z = (torch.from_numpy(np.random.default_rng(1).normal(size=(2, 5, 3, 4))) * 8).to(dtype)
    z[0, :, 0, 0] = torch.finfo(dtype).max                         # a tie at the largest value of the dtype
    z[0, 1, 0, 1] = torch.finfo(dtype).min
    z64 = z.double().numpy()
    p = softmax(z64, axis=1)
    expected = {"msp": 1 - p.max(1), "max_logit": -z64.max(1), "energy": -logsumexp(z64, axis=1),
                "entropy": -(p * np.log(np.where(p > 0, p, 1.0))).sum(1), "gmm": -z64.max(1)}
    outputs = {"logits": z, "log_likelihood": z}
    for name, ref in expected.items():
        got = SCORERS[name](outputs)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-6, atol=1e-6, err_msg=name)


def test_scores_of_ordinary_logits_are_the_plain_formulas_bit_for_bit(rng):
    # softmax-like logits, GMM log-likelihood logits (large, negative) and a few -inf classes
    z = torch.from_numpy(np.concatenate([rng.normal(size=(2, 6, 4, 5)) * 3,
                                         rng.normal(size=(2, 6, 4, 5)) * 50 - 3e4])).float()
    z[0, 2, 1, 1] = z[3, 0, 0, 0] = -INF
    outputs = {"logits": z, "log_likelihood": z}
    stats = {"mean": torch.from_numpy(rng.normal(size=6)).float(), "std": torch.from_numpy(rng.uniform(0.5, 2, 6)).float()}
    top, argmax = z.max(1, keepdim=True)
    shifted = z - top
    logp = z.log_softmax(1)
    m, k = z.max(1)
    plain = {
        "msp": (torch.logsumexp(shifted.scatter(1, argmax, -INF), 1) - torch.logsumexp(shifted, 1)).exp(),
        "max_logit": -z.amax(1),
        "energy": -torch.logsumexp(z, 1),
        "entropy": -torch.where(logp == -INF, 0.0, logp.exp() * logp).sum(1),
        "sml": -(m - stats["mean"][k]) / stats["std"][k],
        "gmm": -z.amax(1),
    }
    for name, ref in plain.items():
        assert torch.equal(SCORERS[name](outputs, sml_stats=stats), ref), name
    for temperature in (0.5, 2.0):
        ref = -temperature * torch.logsumexp(z / temperature, 1)
        assert torch.equal(SCORERS["energy"](outputs, temperature=temperature), ref)
