"""Pixel-wise anomaly scores: higher = more anomalous.

Every scorer has the signature ``fn(outputs: dict, **kw) -> Tensor (B, H, W)`` where ``outputs`` is what
:func:`gmmseg_core.evaluate.predict` returns: ``"logits"`` (B, C, H, W) and, for a generative (GMM) model,
``"log_likelihood"`` (B, C, H, W) = log p(x | c).

=============  ==========================================================  ======================
name           score                                                       needs
=============  ==========================================================  ======================
``msp``        1 - max_c softmax(z)_c                                      logits
``max_logit``  - max_c z_c                                                 logits
``energy``     - T logsumexp_c (z_c / T)   (``temperature`` T, default 1)  logits
``entropy``    - sum_c p_c log p_c,  p = softmax(z)                        logits
``sml``        - (max_c z_c - mu_k) / sigma_k,  k = argmax_c z_c           logits, ``sml_stats``
``gmm``        - max_c log p(x | c)                                        log_likelihood
=============  ==========================================================  ======================

The logit-based scorers apply to any model, the GMM model included (its logits are the class log-likelihoods,
possibly normalised across classes in the "official" variant), so the same GMM network can be scored both with
its density (``gmm``) and with softmax-style scores of its posterior. ``gmm`` is high when the pixel is unlikely
under every class; the logit-based scores read how the classes compete (``msp``, ``entropy``) or how much evidence
the winner has (``max_logit``, ``energy``, ``sml``). On the paper variant's logits, which are the log-densities
themselves, ``max_logit`` equals ``gmm``. ``sml`` is the Standardized Max Logit of Jung et al. (ICCV 2021): the max
logit standardised by the mean and standard deviation of the max logit over the training pixels *predicted* as the
same class (:func:`fit_sml_statistics`).

Infinite logits
---------------
Logits are scored in float32 (half-precision inputs are widened, float64 ones rounded). Every score is the limit
of the scores of finite logits, where that limit is finite: a class whose logit is ``+inf`` takes all the
probability (``msp`` and ``entropy`` 0), a class at ``-inf`` none. Where two or more classes are at ``+inf``, or
every class is at ``-inf``, the limit depends on how they got there; the convention is that of equal logits, as
large as the infinity says: the classes at ``+inf`` share the probability equally (``msp = 1 - 1/m`` and
``entropy = log m`` for ``m`` of them), and a pixel whose logits are all ``-inf`` has the uniform posterior
(``1 - 1/C`` and ``log C``, the most anomalous values). The evidence scores (``max_logit``, ``energy``, ``sml``,
``gmm``) are ``-inf`` when a logit (log-likelihood) is ``+inf`` and ``+inf`` when all are ``-inf``: the limits,
which the anomaly metrics rank as certainly known and certainly anomalous. Large finite logits never overflow
where the score itself is within float32's range. NaN logits give NaN.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gmmseg_core._checks import check_int, is_finite_real

__all__ = ["SCORERS", "msp", "max_logit", "energy", "entropy", "sml", "gmm", "SMLStatistics",
           "fit_sml_statistics", "compute_scores", "scorer_names"]


def _logits(outputs: dict) -> torch.Tensor:
    if "logits" not in outputs:
        raise ValueError(f"outputs must contain 'logits' (B, C, H, W), got keys {sorted(outputs)}")
    z = outputs["logits"]
    if z.dim() != 4:
        raise ValueError(f"outputs['logits'] must be (B, C, H, W), got shape {tuple(z.shape)}")
    return z.float()


def _ties_at_infinity(z: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Logits ``z`` (B, C, H, W) with every pixel whose largest logit ``top`` (B, 1, H, W) is infinite replaced by
    its limit (see the module docstring): 0 for the classes at that infinity (equal logits) and ``-inf`` for the
    others. The other pixels are returned as they are, bit for bit."""
    limit = torch.where(z == top, 0.0, float("-inf"))
    return torch.where(torch.isinf(top), limit, z)


def msp(outputs: dict, **kw) -> torch.Tensor:
    """1 - maximum softmax probability (Hendrycks & Gimpel). Returns (B, H, W).

    Computed as the probability of the other classes, ``exp(logsumexp_{c != argmax} z_c - logsumexp_c z_c)``:
    the difference ``1 - max p`` rounds to exactly 0 in float32 once the top logit leads by about 17, which the
    GMM head's log-likelihood logits often do, and would tie all those pixels.
    """
    z = _logits(outputs)
    top, argmax = z.max(1, keepdim=True)
    z = _ties_at_infinity(z, top)
    z = z - torch.where(torch.isfinite(top), top, 0.0)   # shifted first: large logits keep their precision
    others = z.scatter(1, argmax, float("-inf"))
    return (torch.logsumexp(others, 1) - torch.logsumexp(z, 1)).exp()


def max_logit(outputs: dict, **kw) -> torch.Tensor:
    """Negative maximum logit (Hendrycks et al.). Returns (B, H, W)."""
    return -_logits(outputs).amax(1)


def energy(outputs: dict, temperature: float = 1.0, **kw) -> torch.Tensor:
    """Free energy ``-T logsumexp(z / T)`` (Liu et al.). Returns (B, H, W)."""
    if not (is_finite_real(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    z = _logits(outputs)
    score = -temperature * torch.logsumexp(z / temperature, dim=1)
    top = z.amax(1)
    overflow = torch.isinf(score) & torch.isfinite(top)
    if bool(overflow.any()):  # z / T beyond float32's range (T < 1): the same value taken about the top logit
        about_top = top + temperature * torch.logsumexp((z - top.unsqueeze(1)) / temperature, dim=1)
        score = torch.where(overflow, -about_top, score)
    return score


def entropy(outputs: dict, **kw) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax posterior. Returns (B, H, W)."""
    z = _logits(outputs)
    logp = _ties_at_infinity(z, z.amax(1, keepdim=True)).log_softmax(1)
    # a class with logit -inf has p = 0 and adds nothing (0 * -inf would be NaN); NaN logits still give NaN
    return -torch.where(logp == float("-inf"), 0.0, logp.exp() * logp).sum(1)


def sml(outputs: dict, sml_stats: dict | None = None, **kw) -> torch.Tensor:
    """Standardized max logit: ``-(max_c z_c - mean[k]) / std[k]`` with k the predicted class.

    Parameters
    ----------
    sml_stats : dict
        ``{"mean": (C,), "std": (C,)}`` tensors from :func:`fit_sml_statistics` (or
        :func:`gmmseg_core.evaluate.collect_sml_statistics`).
    """
    if sml_stats is None:
        raise ValueError("the 'sml' scorer needs sml_stats={'mean': (C,), 'std': (C,)}: fit them on training "
                         "data with fit_sml_statistics(...) or evaluate.collect_sml_statistics(model, dataset)")
    z = _logits(outputs)
    mean = torch.as_tensor(sml_stats["mean"], dtype=torch.float32, device=z.device)
    std = torch.as_tensor(sml_stats["std"], dtype=torch.float32, device=z.device)
    if mean.numel() != z.shape[1]:
        raise ValueError(f"sml_stats has {mean.numel()} classes but the logits have {z.shape[1]}")
    m, k = z.max(1)
    score = -(m - mean[k]) / std[k]
    overflow = torch.isinf(score) & torch.isfinite(m)
    if bool(overflow.any()):  # m - mean beyond float32's range, the quotient perhaps not: in float64
        wide = -(m.double() - mean[k].double()) / std[k].double()
        score = torch.where(overflow, wide.float(), score)
    return score


def gmm(outputs: dict, **kw) -> torch.Tensor:
    """GMMSeg's density score ``-max_c log p(x | c)`` from ``outputs["log_likelihood"]``. Returns (B, H, W)."""
    if outputs.get("log_likelihood") is None:
        raise ValueError("the 'gmm' scorer needs outputs['log_likelihood'] (class log-likelihoods of a generative "
                         f"model, head='gmm'); got keys {sorted(k for k, v in outputs.items() if v is not None)}")
    return -outputs["log_likelihood"].float().amax(1)


SCORERS = {"msp": msp, "max_logit": max_logit, "energy": energy, "entropy": entropy, "sml": sml, "gmm": gmm}


def scorer_names(scorers: str | Iterable[str]) -> list[str]:
    """``scorers`` as a list of names (one name may be given as a string), with a clear error for unknown ones."""
    names = [scorers] if isinstance(scorers, str) else list(scorers)
    for name in names:
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; expected one of {sorted(SCORERS)}")
    return names


def compute_scores(outputs: dict, scorers: str | Iterable[str], **kw) -> dict:
    """``{name: SCORERS[name](outputs, **kw)}`` for each name of :func:`scorer_names`."""
    return {name: SCORERS[name](outputs, **kw) for name in scorer_names(scorers)}


class SMLStatistics:
    """Accumulate per-class mean and standard deviation of the max logit over pixels predicted as that class.

    Parameters
    ----------
    num_classes : int
    ignore_index : int, default 255
        Pixels whose label equals it are skipped when labels are given to :meth:`update`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes = check_int("num_classes", num_classes)
        self.ignore_index = ignore_index
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.sum = torch.zeros(num_classes, dtype=torch.float64)
        self.sumsq = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add a batch of logits (B, C, H, W) (labels (B, H, W) optional, to skip ignored pixels)."""
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}, H, W), got shape {tuple(logits.shape)}")
        m, k = logits.double().max(1)
        if labels is not None:
            labels = torch.as_tensor(labels, device=m.device)
            if labels.shape != m.shape:
                raise ValueError(f"labels must be {tuple(m.shape)} for logits of shape {tuple(logits.shape)}, got "
                                 f"{tuple(labels.shape)}")
            keep = labels != self.ignore_index
            m, k = m[keep], k[keep]
        m, k = m.reshape(-1), k.reshape(-1)
        C = self.num_classes
        self.count += torch.bincount(k, minlength=C).double().cpu()
        self.sum += torch.bincount(k, weights=m, minlength=C).cpu()
        self.sumsq += torch.bincount(k, weights=m * m, minlength=C).cpu()

    def compute(self, min_std: float = 1e-6) -> dict:
        """``{"mean": (C,), "std": (C,), "count": (C,)}`` float32 tensors.

        Classes never predicted get the statistics pooled over all pixels (so every class has a finite
        standardisation); std is floored at ``min_std``.
        """
        if self.count.sum() == 0:
            raise ValueError("SMLStatistics.compute() called before any update")
        n = self.count.clamp_min(1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0)
        g_mean = self.sum.sum() / self.count.sum()
        g_var = (self.sumsq.sum() / self.count.sum() - g_mean * g_mean).clamp_min(0)
        seen = self.count > 0
        mean = torch.where(seen, mean, g_mean)
        std = torch.where(seen & (self.count > 1), var.sqrt(), g_var.sqrt()).clamp_min(min_std)
        return {"mean": mean.float(), "std": std.float(), "count": self.count.float()}


def fit_sml_statistics(batches: Iterable, num_classes: int | None = None, ignore_index: int = 255) -> dict:
    """SML statistics from an iterable of logits (B, C, H, W) or of ``(logits, labels)`` pairs.

    Returns ``{"mean": (C,), "std": (C,), "count": (C,)}`` (see :meth:`SMLStatistics.compute`).
    """
    stats = None
    for batch in batches:
        logits, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if stats is None:
            stats = SMLStatistics(num_classes or logits.shape[1], ignore_index=ignore_index)
        stats.update(logits, labels)
    if stats is None:
        raise ValueError("fit_sml_statistics needs at least one batch of logits")
    return stats.compute()
