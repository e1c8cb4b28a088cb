"""Drop-in classifiers over a feature map: ``SoftmaxHead`` (discriminative) and ``GMMHead`` (generative).

Both map features ``(B, Cf, h, w)`` to class logits ``(B, C, h, w)`` and share one interface, so a model
swaps them by assignment::

    head(features) -> logits                      # (B, C, h, w)
    head.extra_loss(features, labels) -> scalar   # added to the cross-entropy by the model
    head.update(features, labels, logits)         # bookkeeping after backward (no gradients)
    head.is_generative

``GMMHead`` models every class by a mixture of ``K`` diagonal Gaussians over a ``D``-dimensional pixel
embedding. Its means and variances are buffers (no gradients): they are fitted by (Sinkhorn) EM on a memory of
embeddings in :meth:`GMMHead.update`, while the cross-entropy trains the embedding. The mixture math lives in
:mod:`gmmseg_core.mixture`; this module only arranges it for a segmentation batch.

Two variants fill the knob defaults (every knob is also a constructor argument, so ablations can mix):

============================  ==============  ===============  ======================================================
knob                          ``"paper"``      ``"official"``   meaning
============================  ==============  ===============  ======================================================
``em``                        ``"sinkhorn"``  ``"sinkhorn"``   E-step: ``"sinkhorn"`` (equipartition) or ``"classic"``
``reduce``                    logsumexp       max              class score from the K component log-densities
``class_norm``                False           True             LayerNorm (learnable affine) across the C class scores
``hard_assign``               False           True             one-hot (argmax) responsibilities
``correct_only``              False           True             enqueue only correctly classified pixels
``max_per_component``         None (all)      20               new memory rows per component per step, evenly spaced
                                                               (never more than ``memory_size``)
``memory_size``               2048            2048 (32000)     FIFO rows per component (released code: 32000)
``mean_momentum``             0.999           0.999            ``mu <- m mu + (1 - m) mu_new``
``variance_momentum``         0.0             0.0              same for the variances (released code: none; its
                                                               knob would blend standard deviations)
``normalize_means``           False           True             L2-normalise the means
``variance_floor``            0.01            0.01             added to every variance (``std = sqrt(var + 0.01)``)
``update_interval``           5               5                M-step every this many ``update`` calls
``m_step_scope``              ``"seen"``      ``"batch"``      classes re-estimated: seen since the last M-step, or
                                                               only those in the current batch (released code)
``component_loss_weight``     0.0             0.01             CE over all C*K components, target = assignment
``sinkhorn_epsilon``          0.05            0.05             entropic weight of the E-step
``sinkhorn_iters``            3               3                Sinkhorn iterations
============================  ==============  ===============  ======================================================

The variance floor keeps a component whose memory holds nearly identical embeddings from shrinking to zero
variance, where its log-density (and the likelihood) would grow without bound; it also caps every log-density at
``-D/2 log(2 pi variance_floor)`` (22.1 nats for ``D = 16`` and the default 0.01).

Shared choices (both variants): the embedding is ``1x1 conv -> BatchNorm -> ReLU -> LayerNorm(D) -> L2
normalisation`` (the released code's; the paper leaves it open, and unit-norm embeddings keep the Gaussians
on a bounded domain), with no dropout before the convolution unless ``dropout`` is given (the released configs
drop 10% of the feature channels there, as mmseg's decode heads do for softmax classifiers too; both heads here
default to none, so a comparison stays like for like), and with PyTorch's default initialisation of that convolution
(the released head builds it as an mmcv ``ConvModule``, which re-initialises it Kaiming-normal over the fan-out);
means start as random unit vectors and variances at 1 (the released code's start); the
Sinkhorn E-step divides each class's log-likelihoods by their largest magnitude before ``exp(./epsilon)`` (as
the released code; it makes ``epsilon`` scale-free); the M-step only uses filled memory rows and leaves
components with an empty memory unchanged (the released code starts the memory with random vectors instead).
With hard assignments each ring holds one component, and per-ring sums of the rows and their squares (float64)
are updated as rows enter and leave, so the M-step costs ``O(C K D)`` instead of a pass over the memory. In the
paper variant each memory row also stores the pixel's soft responsibilities (it is filed under its most
responsible component), and the M-step of a class is the responsibility-weighted estimate over the whole
memory of that class (``mixture.estimate_grouped_diag_gaussian_parameters``; pushing every pixel's weighted moments
into running sums would cost more per step than this pass every ``update_interval`` steps).

How far back the memory reaches depends on how many rows a step pushes. The official variant pushes at most 20
per component, so 2048 rows span at least 100 steps. The paper variant pushes every labelled pixel: at the cpu
profile's sizes (a few thousand feature pixels per batch) a ring of a frequent class holds roughly ten steps (of a
rare class, more), but once a batch brings a ring more than ``memory_size`` rows, the ring holds an evenly
spaced part of the latest batch only, and each M-step sees that batch alone. For large batches, raise
``memory_size`` or set ``max_per_component`` to keep a history.

On a CPU the bookkeeping between the forward and the M-step (gathering each labelled pixel's own-class
log-densities, the E-step, filing the pixels into their rings) runs as compiled loops
(:mod:`gmmseg_core.cpu_kernels`), which do what the torch code here does for other devices, in a fraction of the
time at the cpu profile's sizes.

Distributed training: ``update`` gathers the labelled pixels of all processes (embeddings, labels,
correctness, own-class log-densities) and runs the E-step, push and M-step on their union, so every process
keeps identical parameters without broadcasting them (the released code runs Sinkhorn per GPU and then
gathers). The extra loss uses the local E-step. Wrap the model in ``DistributedDataParallel`` without the buffer
broadcast before every forward (``forward_sync_buffers=False`` from torch 2.14 on, ``broadcast_buffers=False``
before; ``gmmseg_core.train`` picks the one its torch has): the memory is large and already identical everywhere.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmmseg_core import cpu_kernels, mixture
from gmmseg_core._checks import check_int, is_finite_real, is_real
from gmmseg_core.distributed import all_gather_rows, world_size
from gmmseg_core.head_ops import (
    ChannelLayerNorm,
    ComponentLogProbMaps,
    L2Normalize,
    first_max,
    gaussian_terms,
)
from gmmseg_core.memory import group_counts, ring_push, select_evenly_spaced

IGNORE_INDEX = 255

VARIANT_DEFAULTS: dict[str, dict] = {
    "paper": dict(em="sinkhorn", reduce="logsumexp", class_norm=False, hard_assign=False, correct_only=False,
                  max_per_component=None, memory_size=2048, mean_momentum=0.999, variance_momentum=0.0,
                  normalize_means=False, variance_floor=0.01, update_interval=5, m_step_scope="seen",
                  component_loss_weight=0.0, sinkhorn_epsilon=0.05, sinkhorn_iters=3),
    "official": dict(em="sinkhorn", reduce="max", class_norm=True, hard_assign=True, correct_only=True,
                     max_per_component=20, memory_size=2048, mean_momentum=0.999, variance_momentum=0.0,
                     normalize_means=True, variance_floor=0.01, update_interval=5, m_step_scope="batch",
                     component_loss_weight=0.01, sinkhorn_epsilon=0.05, sinkhorn_iters=3),
}
OFFICIAL_MEMORY_SIZE = 32000


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a label map ``(B, H, W)`` to ``(B, *size)`` (long), by :func:`_nearest_maps`
    (a strided view when the sizes divide, no float round trip)."""
    (H, W), (h, w) = labels.shape[-2:], size
    if H % h == 0 and W % w == 0:
        return _nearest_maps(labels, size).long()
    return _nearest_maps(labels[:, None].float(), size)[:, 0].long()


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``. Before torch 2.4 that function takes no device and answers for
    CUDA; other device types have their own query (``is_autocast_cpu_enabled``, ...), and none means no autocast."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        query = getattr(torch, f"is_autocast_{device_type}_enabled", None)
        return bool(query()) if query is not None else False


@contextmanager
def _autocast_off(device_type: str):
    """Autocast off on ``device_type`` for the block; entering ``torch.autocast`` only where it is on (the
    context manager itself costs tens of microseconds, a step of the head at the cpu profile's sizes a few
    milliseconds)."""
    if not _autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _without_autocast(method):
    """Run a head method with autocast off on the head's device: the EM bookkeeping stays in the Gaussians'
    precision when a caller wraps the whole training step in autocast."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _autocast_off(self.means.device.type):
            return method(self, *args, **kwargs)
    return wrapper


class SoftmaxHead(nn.Module):
    """Discriminative classifier: optional dropout, then a 1x1 convolution.

    Parameters
    ----------
    in_channels : int
        Feature channels ``Cf``.
    num_classes : int
    dropout : float
        Dropout probability before the classifier (0 disables it).
    """

    is_generative = False

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        in_channels, num_classes = check_int("in_channels", in_channels), check_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.dropout = _channel_dropout(dropout)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(B, C, h, w)`` from features ``(B, Cf, h, w)``."""
        _check_features(features, self.classifier.in_channels)
        return self.classifier(self.dropout(features))

    def class_log_likelihood(self, features: Tensor) -> Tensor:
        raise TypeError("class_log_likelihood needs a generative head (GMMHead); this is a SoftmaxHead, "
                        "whose logits are not class-conditional densities")

    def extra_loss(self, features: Tensor, labels: Tensor, **_) -> Tensor:
        """Always 0 (a scalar on the features' device)."""
        return features.new_zeros(())

    def update(self, features: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        """Nothing to update: the softmax classifier is trained by back-propagation only."""


class GMMHead(nn.Module):
    """Generative classifier: a mixture of ``K`` diagonal Gaussians per class over a pixel embedding.

    Parameters
    ----------
    in_channels : int
        Feature channels ``Cf``.
    num_classes : int
        ``C``.
    embed_dim : int
        Embedding size ``D``, at least 3 (see the embedding in the module docstring: with fewer values per pixel
        its LayerNorm and L2 normalisation leave only a few points).
    num_components : int
        Components per class ``K``.
    variant : {"paper", "official"}
        Fills the defaults of every knob left as None (see the module docstring for the table).
    em, reduce, class_norm, hard_assign, correct_only, max_per_component, memory_size, mean_momentum,
    variance_momentum, normalize_means, variance_floor, update_interval, m_step_scope, component_loss_weight,
    sinkhorn_epsilon, sinkhorn_iters
        Knobs; None takes the variant's value, except for ``max_per_component`` where None means "no cap" and
        the variant's value is the default (``"default"``).
    ignore_index : int
        Label of pixels that never enter the mixtures.
    dropout : float
        Channel dropout (``Dropout2d``) on the features before the embedding's convolution, in training only;
        0 (default) disables it. The released configs use 0.1.
    momentum : float, optional
        Another name for ``mean_momentum`` (the means' momentum, the one the method describes); the variances
        have their own, ``variance_momentum``, 0 in both variants as in the released code.

    Attributes (buffers, all in ``state_dict``)
    -------------------------------------------
    means, variances : (C, K, D)
    memory : (C*K, memory_size, D); memory_ptr, memory_count : (C*K,) long
    memory_resp : (C*K, memory_size, K), soft responsibilities (only when ``hard_assign`` is False)
    memory_sum, memory_sumsq : (C*K, D) float64, running ring sums (only when ``hard_assign`` is True)
    num_updates : () long, calls of ``update`` so far; seen : (C,) bool, classes seen since the last M-step
    (kept for ``m_step_scope="seen"`` only; all False under ``"batch"``)
    """

    is_generative = True

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int = 64, num_components: int = 5,
                 variant: str = "paper", *, em: str | None = None, reduce: str | None = None,
                 class_norm: bool | None = None, hard_assign: bool | None = None,
                 correct_only: bool | None = None, max_per_component: int | None | str = "default",
                 memory_size: int | None = None, mean_momentum: float | None = None,
                 variance_momentum: float | None = None, normalize_means: bool | None = None,
                 variance_floor: float | None = None, update_interval: int | None = None,
                 m_step_scope: str | None = None, component_loss_weight: float | None = None,
                 sinkhorn_epsilon: float | None = None, sinkhorn_iters: int | None = None,
                 ignore_index: int = IGNORE_INDEX, dropout: float = 0.0, momentum: float | None = None):
        super().__init__()
        if momentum is not None:
            if mean_momentum is not None and mean_momentum != momentum:
                raise ValueError(f"momentum is another name for mean_momentum; got momentum={momentum!r} and "
                                 f"mean_momentum={mean_momentum!r}")
            mean_momentum = momentum
        if variant not in VARIANT_DEFAULTS:
            raise ValueError(f"variant must be one of {sorted(VARIANT_DEFAULTS)}, got {variant!r}")
        in_channels, num_classes = check_int("in_channels", in_channels), check_int("num_classes", num_classes)
        embed_dim, num_components = check_int("embed_dim", embed_dim), check_int("num_components", num_components)
        if embed_dim < 3:
            raise ValueError(f"embed_dim must be >= 3, got {embed_dim}: the embedding's LayerNorm over D values "
                             "followed by the L2 normalisation maps every pixel to one point for D=1 and to one "
                             "of three for D=2, with no gradient to learn from")
        given = dict(em=em, reduce=reduce, class_norm=class_norm, hard_assign=hard_assign,
                     correct_only=correct_only, memory_size=memory_size, mean_momentum=mean_momentum,
                     variance_momentum=variance_momentum, normalize_means=normalize_means,
                     variance_floor=variance_floor, update_interval=update_interval, m_step_scope=m_step_scope,
                     component_loss_weight=component_loss_weight, sinkhorn_epsilon=sinkhorn_epsilon,
                     sinkhorn_iters=sinkhorn_iters)
        knobs = {k: (VARIANT_DEFAULTS[variant][k] if v is None else v) for k, v in given.items()}
        # None is a meaningful value here (no cap), so "default" marks "take the variant's".
        knobs["max_per_component"] = (VARIANT_DEFAULTS[variant]["max_per_component"]
                                      if max_per_component == "default" else max_per_component)
        _check_knobs(knobs)
        self.dropout = _channel_dropout(dropout)
        self.variant = variant
        self.num_classes, self.num_components, self.embed_dim = num_classes, num_components, embed_dim
        self.ignore_index = ignore_index
        for name, value in knobs.items():
            setattr(self, name, value)

        self.embed = nn.Sequential(nn.Conv2d(in_channels, embed_dim, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
        # Which side of the 1x1 convolution is copied to channels-last (see ``embedding``): the input when it
        # has no more channels than the embedding, else the output. The weight is stored the same way (identical
        # bytes for a 1x1 kernel): a channels-last weight would make the convolution of an NCHW input
        # channels-last, and a weight whose strides differ from its gradient's made DDP warn and copy every step.
        self._channels_last_input = in_channels <= embed_dim
        if self._channels_last_input:
            self.embed[0].to(memory_format=torch.channels_last)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.class_normalizer = nn.LayerNorm(num_classes) if self.class_norm else None

        C, K, D, M = num_classes, num_components, embed_dim, self.memory_size
        self.register_buffer("means", F.normalize(torch.randn(C, K, D), dim=-1))
        self.register_buffer("variances", torch.ones(C, K, D))
        self.register_buffer("memory", torch.zeros(C * K, M, D))
        self.register_buffer("memory_ptr", torch.zeros(C * K, dtype=torch.long))
        self.register_buffer("memory_count", torch.zeros(C * K, dtype=torch.long))
        self.register_buffer("memory_resp", None if self.hard_assign else torch.zeros(C * K, M, K))
        # hard assignments: running per-ring sums (float64), so the M-step never reads the whole memory
        self.register_buffer("memory_sum", torch.zeros(C * K, D, dtype=torch.float64) if self.hard_assign else None)
        self.register_buffer("memory_sumsq", torch.zeros(C * K, D, dtype=torch.float64) if self.hard_assign else None)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(C, dtype=torch.bool))
        self._cache: dict | None = None
        self._terms: tuple | None = None      # the Gaussians' product terms, see _gaussian_terms

    def __getstate__(self):
        # The forward's cache only serves an update with that very features tensor, which a copy never gets;
        # it holds the batch's autograd graph, which deepcopy refuses and pickle would store.
        state = super().__getstate__()
        state["_cache"] = None
        state["_terms"] = None
        return state

    def extra_repr(self) -> str:
        knobs = ", ".join(f"{k}={getattr(self, k)!r}" for k in VARIANT_DEFAULTS["paper"])
        return (f"num_classes={self.num_classes}, num_components={self.num_components}, "
                f"embed_dim={self.embed_dim}, variant={self.variant!r}, {knobs}")

    # ------------------------------------------------------------------ forward
    def embedding(self, features: Tensor) -> Tensor:
        """Unit-norm pixel embeddings ``(B, h, w, D)`` from features ``(B, Cf, h, w)``, contiguous, in float32
        or wider."""
        _check_features(features, self.embed[0].in_channels)
        # Every op after the convolution works on contiguous (pixels, D) rows: BatchNorm and ReLU on a
        # channels-last view, then the LayerNorm over D and the L2 normalisation (fused kernels over rows, at the
        # released sizes faster on a CPU than reductions over the channels of NCHW maps). The copy to that layout
        # takes the smaller side of the convolution. With more input channels than D (every in-house model, and
        # smp's decoders), the convolution runs in the backbone's layout (NCHW) and its D output channels are
        # copied; its gradient then goes back into the backbone as NCHW too (a channels-last one made the
        # backbone's NCHW layers several times slower in the backward on a CPU). Otherwise the input is copied,
        # and the convolution is one large product (Cf = D = 64: about 20% faster on a CPU than the other way).
        conv, batch_norm, relu = self.embed
        features = self.dropout(features)
        if self._channels_last_input:
            x = conv(features.contiguous(memory_format=torch.channels_last))
        else:
            x = conv(features).contiguous(memory_format=torch.channels_last)
        rows = relu(batch_norm(x)).permute(0, 2, 3, 1)                                  # (B, h, w, D)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))   # from here on as the log-densities
        norm = self.embed_norm
        rows = F.layer_norm(rows, norm.normalized_shape, norm.weight.to(rows.dtype), norm.bias.to(rows.dtype),
                            norm.eps)
        return L2Normalize.apply(rows)

    def _flat_gaussian_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings ``x (..., D)`` as rows ``(N, D)``, and the means and variances ``(C*K, D)``, in one dtype:
        float32, or wider for a wider head (autocast's half precision never reaches the log-densities)."""
        D = self.embed_dim
        dtype = torch.promote_types(torch.float32, self.means.dtype)
        return x.reshape(-1, D).to(dtype), self.means.reshape(-1, D).to(dtype), self.variances.reshape(-1, D).to(dtype)

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; mu_ck, diag var_ck) ``(..., C, K)`` of embeddings ``x (..., D)``, in float32."""
        with _autocast_off(x.device.type):
            logp = mixture.diag_gaussian_log_prob(*self._flat_gaussian_inputs(x))
        return logp.reshape(*x.shape[:-1], self.num_classes, self.num_components)

    def _gaussian_terms(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`gaussian_terms` of the current means and variances in ``dtype``, computed once per change of
        either (their version counters move with every in-place update: the M-step, ``load_state_dict``)."""
        means, variances = self.means, self.variances
        cached = getattr(self, "_terms", None)
        if (cached is None or cached[0] is not means or cached[1] is not variances
                or cached[2] != (means._version, variances._version, dtype)):
            with torch.no_grad():
                D = self.embed_dim
                terms = gaussian_terms(means.reshape(-1, D).to(dtype), variances.reshape(-1, D).to(dtype))
            # the tensors themselves are kept, not their addresses: a new tensor at a freed one's address with the
            # same version count must not pass for it
            cached = self._terms = (means, variances, (means._version, variances._version, dtype), terms)
        return cached[3]

    def _maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Class scores ``(B, C, h, w)`` (the reduction over each class's components) and the component
        log-densities ``(B, C, K, h, w)`` of embeddings ``x (B, h, w, D)``, both contiguous."""
        B, h, w, D = x.shape
        C, K = self.num_classes, self.num_components
        dtype = torch.promote_types(torch.float32, self.means.dtype)
        offset = -math.log(K) if self.reduce == "logsumexp" else 0.0     # the mixture's uniform weights 1/K
        with _autocast_off(x.device.type):
            if torch.is_grad_enabled() and (self.means.requires_grad or self.variances.requires_grad):
                # an ablation that trains the Gaussians by gradient: the general differentiable log-density
                comp = self.component_log_prob(x).permute(0, 3, 4, 1, 2).contiguous()       # (B, C, K, h, w)
                scores = comp.amax(dim=2) if self.reduce == "max" else torch.logsumexp(comp, dim=2) + offset
                return scores, comp
            comp, scores = ComponentLogProbMaps.apply(x.reshape(B, h * w, D).to(dtype), self._gaussian_terms(dtype),
                                                      K, self.reduce, offset)
        return scores.view(B, C, h, w), comp.view(B, C, K, h, w)

    def _normalize_classes(self, scores: Tensor) -> Tensor:
        """The LayerNorm across the classes of scores ``(B, C, h, w)`` (``class_norm``), in the scores' dtype:
        float32 even for a head cast to half precision, whose log-densities are float32 (see
        ``_flat_gaussian_inputs``)."""
        norm = self.class_normalizer
        if norm is None:
            return scores
        return ChannelLayerNorm.apply(scores, norm.weight.to(scores.dtype), norm.bias.to(scores.dtype), norm.eps)

    def forward(self, features: Tensor, return_component_logp: bool = False):
        """Class logits ``(B, C, h, w)``.

        Parameters
        ----------
        features : Tensor (B, Cf, h, w)
        return_component_logp : bool
            Also return the component log-densities ``(B, C, K, h, w)`` (for ``extra_loss``).

        Returns
        -------
        logits : Tensor (B, C, h, w)
            ``log p(x|c)`` (paper), or that score normalised across classes when ``class_norm``.
        component_logp : Tensor (B, C, K, h, w), only if ``return_component_logp``
        """
        x = self.embedding(features)                              # (B, h, w, D)
        scores, comp = self._maps(x)                              # (B, C, h, w), (B, C, K, h, w)
        logits = self._normalize_classes(scores)
        if self.training and torch.is_grad_enabled():
            self._cache = dict(features=features, x=x.detach(), comp=comp, logits=logits.detach())
        if return_component_logp:
            return logits, comp
        return logits

    def class_log_likelihood(self, features: Tensor) -> Tensor:
        """``log p(x|c)`` ``(B, C, h, w)`` before any normalisation across classes.

        With ``reduce="logsumexp"`` this is the mixture density with ``pi = 1/K``; with ``reduce="max"`` it is the
        largest component log-density (the released code's class score).
        """
        scores, _ = self._maps(self.embedding(features))
        return scores

    # ------------------------------------------------------------------ E-step and extra loss
    def _cached(self, features: Tensor) -> dict:
        """Embeddings, component log-densities and logits of ``features``: from forward's cache or recomputed."""
        cache = self._cache
        if cache is not None and cache["features"] is features:
            return cache
        with torch.no_grad(), _frozen_batchnorm(self.embed):
            x = self.embedding(features)
            scores, comp = self._maps(x)
        return dict(features=features, x=x, comp=comp, logits=self._normalize_classes(scores))

    def e_step(self, logp: Tensor, labels: Tensor) -> Tensor:
        """Responsibilities of each pixel over its own class's components.

        Parameters
        ----------
        logp : Tensor (n, K)
            Log-density of every pixel under the K components of its labelled class.
        labels : LongTensor (n,)
            Class of every pixel (all valid).

        Returns
        -------
        Tensor (n, K)
            Rows sum to 1 (one-hot when ``hard_assign``). With ``em="sinkhorn"`` one Sinkhorn problem per class,
            all solved in one call (``mixture.grouped_sinkhorn``), balances the components of every class, as far
            as ``sinkhorn_iters`` iterations get: fully while they overlap, partly once they separate (see
            :mod:`gmmseg_core.mixture`).
        """
        resp, component = self._e_step(logp, labels)
        if self.hard_assign:
            # scatter rather than F.one_hot, which checks the index range on the host (a GPU synchronisation)
            resp = logp.new_zeros(logp.shape).scatter_(1, component.unsqueeze(1), 1.0)
        return resp

    def _e_step(self, logp: Tensor, labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """The E-step's plan ``(n, K)`` (``e_step``'s responsibilities before any one-hot; None with
        ``hard_assign``, where the memory needs the component only) and each pixel's most responsible component
        ``(n,)``."""
        K, hard = self.num_components, self.hard_assign
        if logp.numel() == 0:
            return (None if hard else logp.new_zeros(0, K)), labels.new_zeros(0)
        if self.em == "classic":
            if hard:                                        # the softmax keeps the order of each row
                return None, first_max(logp, 1)[1]
            resp = torch.softmax(logp.T, dim=0).T          # over K, along rows of pixels when logp is a (K, n).T
        else:
            # each class's scores divided by their largest magnitude (the released code's scale-free epsilon)
            if cpu_kernels.available(logp):
                solved = cpu_kernels.grouped_sinkhorn(logp, labels, self.num_classes, self.sinkhorn_epsilon,
                                                      self.sinkhorn_iters, scale=True, assign=hard)
                if solved is not None:                      # None: a score or a column mass the kernel declines
                    return solved
            scale = logp.new_zeros(self.num_classes).scatter_reduce_(0, labels, logp.abs().amax(1), "amax")
            scaled = logp / scale.clamp_min_(torch.finfo(logp.dtype).tiny).index_select(0, labels).unsqueeze(1)
            resp = mixture.grouped_sinkhorn(scaled, labels, self.num_classes, epsilon=self.sinkhorn_epsilon,
                                            n_iters=self.sinkhorn_iters, assign=hard)
            if hard:
                return None, resp
        return resp, first_max(resp, 1)[1]

    def _assignments(self, cache: dict, labels: Tensor) -> dict:
        """Valid pixels of the batch and their E-step (computed once per forward, shared by loss and update)."""
        if "assign" in cache and cache["assign"]["source"] is labels:
            return cache["assign"]
        x, comp = cache["x"], cache["comp"].detach()
        _check_labels(labels, x.shape[0])
        C, K, P = self.num_classes, self.num_components, x.shape[1] * x.shape[2]
        y = resize_labels(labels.to(x.device), tuple(x.shape[1:3]))                  # (B, h, w)
        if cpu_kernels.available(comp, y):
            idx, yv, image, logp = cpu_kernels.own_class_table(comp, y, self.ignore_index)
        else:
            y = y.reshape(-1)
            valid = (y < C) & (y >= 0)
            if 0 <= self.ignore_index < C:                  # otherwise the range already excludes it
                valid &= y != self.ignore_index
            idx = valid.nonzero().squeeze(1)
            yv = y.index_select(0, idx)
            image = idx // P
            # pixel i of class c has its K log-densities at comp[b, c, :, p], K P apart from its class's first: one
            # flat gather, into a (K, n) table whose transpose (a view) is the (n, K) one: the E-step works along
            # the pixels, and its reductions over K then run across contiguous rows
            first = _own_class_flat_index(idx, yv, image, C, K, P)
            where = torch.arange(0, K * P, P, device=idx.device).unsqueeze(1) + first        # (K, n)
            logp = comp.reshape(-1).index_select(0, where.view(-1)).view(K, -1).T
        resp, component = self._e_step(logp, yv)
        assign = dict(source=labels, idx=idx, image=image, labels=yv, logp=logp, resp=resp,
                      component=component)
        cache["assign"] = assign
        return assign

    def extra_loss(self, features: Tensor, labels: Tensor, component_logp: Tensor | None = None) -> Tensor:
        """``component_loss_weight`` x cross-entropy over the C*K component log-densities.

        The target of a pixel is its assigned component ``c * K + argmax_k resp`` (ignored pixels excluded).
        Every such target counts, 255 included: the released code marks ignored pixels with its label 255 in the
        same target space, so there the component whose index ``c * K + k`` is 255 never gets this loss
        (class 51, component 0 of the COCO-Stuff config, K=5; class 31, component 7 of the ADE20K one, K=8).

        Parameters
        ----------
        features : Tensor (B, Cf, h, w)
        labels : LongTensor (B, H, W)
        component_logp : Tensor (B, C, K, h, w), optional
            From ``forward(features, return_component_logp=True)``, to avoid recomputing it; otherwise the cached
            forward of the same ``features`` tensor is used, or it is recomputed.

        Returns
        -------
        Tensor, scalar (0 when ``component_loss_weight`` is 0 or no pixel is valid)
        """
        if self.component_loss_weight == 0:
            return features.new_zeros(())
        cache = self._cached(features)
        if component_logp is not None:
            comp = component_logp
        elif cache is self._cache:
            comp = cache["comp"]
        else:
            with _frozen_batchnorm(self.embed):
                comp = self._maps(self.embedding(features))[1]
        assign = self._assignments(cache, labels)
        if assign["idx"].numel() == 0:
            return comp.sum() * 0.0
        B, C, K, h, w = comp.shape
        # a target for every pixel (ignored ones -100): no (n, C*K) gather and scatter in the backward
        target = torch.full((B * h * w,), -100, dtype=torch.long, device=comp.device)
        target.index_copy_(0, assign["idx"], assign["labels"] * K + assign["component"])
        return self.component_loss_weight * F.cross_entropy(comp.reshape(B, C * K, h, w), target.view(B, h, w),
                                                            ignore_index=-100)

    # ------------------------------------------------------------------ EM bookkeeping
    @torch.no_grad()
    @_without_autocast
    def update(self, features: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        """E-step on the batch, memory push, and every ``update_interval`` calls the M-step.

        Parameters
        ----------
        features : Tensor (B, Cf, h, w)
            The features the logits came from (the forward's cache is reused when it is the same tensor).
        labels : LongTensor (B, H, W)
            Any resolution (nearest-resized to ``h x w``); ``ignore_index`` pixels are skipped.
        logits : Tensor (B, C, H', W'), optional
            Used for ``correct_only`` (argmax, nearest-resized to ``h x w``); None uses the head's own logits at
            feature resolution.

        Under ``torch.distributed`` the valid pixels of all processes are gathered first, so every process runs
        the same E-step, memory push and M-step on the union and ends with identical parameters.
        """
        cache = self._cached(features)
        self._cache = None
        if logits is not None:
            _check_logits(logits, features.shape[0], self.num_classes)
        assign = self._assignments(cache, labels)
        idx, yv = assign["idx"], assign["labels"]
        # only the pushed rows of x are read (at most C*K*max_per_component), not every valid pixel's
        x, rows = cache["x"].reshape(-1, self.embed_dim), idx
        h, w = cache["x"].shape[1:3]
        distributed = world_size() > 1
        if self.correct_only or distributed:
            correct = _own_class_on_top(cache["logits"] if logits is None else logits, assign, (h, w))
        else:
            correct = None                                  # not read: every valid pixel is pushed
        logp, resp, component = assign["logp"], assign["resp"], assign["component"]
        if distributed:
            wide = torch.promote_types(torch.float32, self.means.dtype)     # a float64 head gathers float64
            packed = torch.cat([x.index_select(0, rows).to(wide), logp.to(wide), yv[:, None].to(wide),
                                correct[:, None].to(wide)], dim=1)
            packed = all_gather_rows(packed)
            D, K = self.embed_dim, self.num_components
            x, rows, logp = packed[:, :D], None, packed[:, D:D + K]
            yv, correct = packed[:, D + K].long(), packed[:, D + K + 1].bool()
            resp, component = self._e_step(logp, yv)
        self._push(x, rows, yv, resp, component, correct)
        if self.m_step_scope == "seen":
            self.seen.logical_or_(group_counts(yv, self.num_classes) > 0)
        if int(self.num_updates) % self.update_interval == 0:
            self.m_step(group_counts(yv, self.num_classes) > 0 if self.m_step_scope == "batch" else self.seen.clone())
            self.seen.zero_()
        self.num_updates.add_(1)

    def _push(self, x: Tensor, rows: Tensor | None, labels: Tensor, resp: Tensor | None, component: Tensor,
              correct: Tensor | None) -> None:
        """Push pixels into their rings; pixel ``i`` is ``x[rows[i]]`` (``x[i]`` when ``rows`` is None)."""
        # A ring takes at most memory_size rows per push: beyond that, pushing all would keep only the batch's
        # last rows (its last images, their bottom rows), so evenly spaced ones are kept instead.
        cap = self.memory_size if self.max_per_component is None else min(self.max_per_component, self.memory_size)
        stats = None if self.memory_sum is None else (self.memory_sum, self.memory_sumsq)
        if cpu_kernels.available(x, self.memory, *(() if resp is None else (resp,))):
            cpu_kernels.push_evenly_spaced(self.memory, self.memory_ptr, self.memory_count, x, rows, labels,
                                           component, self.num_components, correct if self.correct_only else None,
                                           cap, resp if self.memory_resp is not None else None, self.memory_resp,
                                           stats)
            return
        group = labels * self.num_components + component                       # ring of every pixel
        keep = correct.nonzero().squeeze(1) if self.correct_only else None
        if keep is not None:
            group = group.index_select(0, keep)
        chosen, group, counts, ranks = select_evenly_spaced(group, self.num_classes * self.num_components, cap,
                                                            return_ranks=True)
        sel = chosen if keep is None else keep.index_select(0, chosen)
        extras = () if self.memory_resp is None else ((self.memory_resp, _select_rows(resp, sel)),)
        values = x.index_select(0, sel if rows is None else rows.index_select(0, sel))
        ring_push(self.memory, self.memory_ptr, self.memory_count, values, group, extras, stats, counts, ranks)

    @torch.no_grad()
    def _apply(self, fn, recurse=True):
        # ``.float()`` / ``.half()`` would cast the float64 ring sums too: keep them (bit for bit, on the new
        # device), or recompute them in float64 when the memory itself changed dtype
        sums, memory_dtype = (self.memory_sum, self.memory_sumsq), self.memory.dtype
        super()._apply(fn, recurse)
        if self.memory_sum is not None and self.memory_sum.dtype != torch.float64:
            device = self.memory.device
            self.memory_sum, self.memory_sumsq = (t.to(device) for t in sums)
            if self.memory.dtype != memory_dtype:
                self.refresh_memory_statistics()
        return self

    @torch.no_grad()
    def refresh_memory_statistics(self) -> None:
        """Recompute the running ring sums from the filled memory rows (after editing ``memory`` by hand)."""
        if self.memory_sum is None:
            return
        filled = torch.arange(self.memory_size, device=self.memory.device) < self.memory_count[:, None]
        for start in range(0, self.memory.shape[0], 8):           # blocks of rings bound the float64 copy
            block = self.memory[start:start + 8].double() * filled[start:start + 8, :, None]
            self.memory_sum[start:start + 8] = block.sum(dim=1)
            self.memory_sumsq[start:start + 8] = block.square().sum(dim=1)

    @torch.no_grad()
    @_without_autocast
    def m_step(self, classes: Tensor | None = None) -> None:
        """Re-estimate means and variances from the memory, blended with momentum.

        Parameters
        ----------
        classes : BoolTensor (C,), optional
            Classes to update (default: all). Components with an empty memory are left unchanged.
        """
        C, K, D, M = self.num_classes, self.num_components, self.embed_dim, self.memory_size
        if classes is not None and not (isinstance(classes, Tensor) and classes.dtype == torch.bool
                                        and tuple(classes.shape) == (C,)):
            got = f"{classes.dtype} {tuple(classes.shape)}" if isinstance(classes, Tensor) else type(classes).__name__
            raise ValueError(f"classes must be a bool mask ({C},) over the classes, got {got}")
        if self.memory_resp is None:                   # one component per ring: its mean and variance
            nk = self.memory_count.to(torch.float64)
            mu = self.memory_sum / nk.clamp(min=1.0)[:, None]
            var = (self.memory_sumsq / nk.clamp(min=1.0)[:, None] - mu.square()).clamp(min=0.0)
            nk, mu, var = nk.to(self.means.dtype), mu.to(self.means.dtype), var.to(self.means.dtype)
            var = var + self.variance_floor
        else:                                          # soft: weighted statistics over the class's memory
            filled = torch.arange(M, device=self.memory.device) < self.memory_count[:, None]  # (C*K, M)
            # Unfilled rows get zero weight (a pass over the small responsibility buffer, not over the memory);
            # the memory holds finite values everywhere (zeros until written), so no mask is needed. The current
            # means as expansion centres: same result, one pass over the memory instead of two.
            weight = self.memory_resp if bool(filled.all()) else self.memory_resp * filled[..., None]
            # every row sits in the ring of its most responsible component: expand each ring about that mean
            nk, mu, var = mixture.estimate_grouped_diag_gaussian_parameters(
                self.memory.reshape(C, K, M, D), weight.reshape(C, K, M, K), self.means,
                reg_covar=self.variance_floor)
        nk, mu, var = nk.reshape(C, K), mu.reshape(C, K, D), var.reshape(C, K, D)
        if self.normalize_means:
            target = F.normalize(mu, dim=-1)
            var = var + (mu - target) ** 2             # variance about the normalised mean, as released
        else:
            target = mu
        ok = (self.memory_count.reshape(C, K) > 0) & (nk > 1e-3)
        if classes is not None:
            ok &= classes.to(ok.device)[:, None]
        new_means = self.mean_momentum * self.means + (1 - self.mean_momentum) * target
        if self.normalize_means:
            new_means = F.normalize(new_means, dim=-1)
        new_vars = self.variance_momentum * self.variances + (1 - self.variance_momentum) * var
        self.means.copy_(torch.where(ok[..., None], new_means, self.means))
        self.variances.copy_(torch.where(ok[..., None], new_vars, self.variances))


def _nearest_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of maps ``(..., H, W)`` to ``(..., *size)`` (any leading dimensions; float ones
    where the sizes do not divide).

    ``F.interpolate(mode="nearest")`` reads source row ``floor(i * H / h)``; when ``h`` divides ``H`` (and ``w``
    divides ``W``) that is every ``H / h``-th row, so a strided view gives the same values without a copy.
    """
    (H, W), (h, w) = maps.shape[-2:], size
    if (H, W) == (h, w):
        return maps
    if H % h == 0 and W % w == 0:
        return maps[..., :: H // h, :: W // w]
    return F.interpolate(maps, size=size, mode="nearest")


def _own_class_on_top(logits: Tensor, assign: dict, size: tuple[int, int]) -> Tensor:
    """Whether each valid pixel of ``assign`` was classified correctly ``(n,)`` bool, from ``logits (B, C, H, W)``
    nearest-resized to the feature size.

    A pixel counts as correct when its own class's logit is the largest of its C: the same as ``argmax == label``
    except at an exact tie, which counts as correct here. Read as a comparison of two gathered values rather than
    through an arg-max over the classes, which over NCHW maps takes a slow path on a CPU (8 x 8 x 16 x 32 logits:
    41 against 23 µs).
    """
    logits = _nearest_maps(logits, size)
    idx = assign["idx"]
    top = logits.amax(1).reshape(-1).index_select(0, idx)
    own = _own_class_flat_index(idx, assign["labels"], assign["image"], logits.shape[1], 1, size[0] * size[1])
    return logits.reshape(-1).index_select(0, own) >= top


def _own_class_flat_index(idx: Tensor, labels: Tensor, image: Tensor, num_classes: int, per_class: int,
                          pixels: int) -> Tensor:
    """Flat positions ``(n,)``, in maps ``(B, num_classes * per_class, pixels)``, of the first of ``per_class``
    channels of each pixel's own class: pixel ``i = b P + p`` (``b = image``) of class ``c`` (``labels``) is at
    ``(b C K + c K) P + p = i + c K P + b (C K - 1) P``, with ``C = num_classes``, ``K = per_class``."""
    K = per_class
    return torch.add(idx, labels, alpha=K * pixels).add_(image, alpha=(num_classes * K - 1) * pixels)


def _select_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(0, index)`` of a 2-D ``t``; for the transpose of a contiguous tensor (the E-step's ``(K, n)``
    tables seen as ``(n, K)``) the gather runs along that tensor's rows, several times faster on a CPU."""
    if t.dim() == 2 and t.T.is_contiguous() and not t.is_contiguous():
        return t.T.index_select(1, index).T
    return t.index_select(0, index)


@contextmanager
def _frozen_batchnorm(module: nn.Module):
    """Run a module without moving its BatchNorm running statistics (momentum 0 during the block) or their
    batch counters (restored afterwards)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _shape_or_type(value) -> tuple | str:
    """What an argument check reports of a value that should have been a tensor: its shape, else its type."""
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_features(features, in_channels: int) -> None:
    """A head's input must be a feature map ``(B, in_channels, h, w)``."""
    if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != in_channels:
        raise ValueError(f"features must be a feature map (B, {in_channels}, h, w), got {_shape_or_type(features)}")


def _check_labels(labels, batch: int) -> None:
    """Labels of ``batch`` feature maps must be a label map ``(batch, H, W)``, of any resolution."""
    if not isinstance(labels, Tensor) or labels.dim() != 3 or labels.shape[0] != batch:
        raise ValueError(f"labels must be a label map ({batch}, H, W) for a batch of {batch} feature maps, "
                         f"got {_shape_or_type(labels)}")


def _check_logits(logits, batch: int, num_classes: int) -> None:
    """Logits given to ``update`` must be ``(batch, num_classes, H', W')``, of any resolution."""
    if not isinstance(logits, Tensor) or logits.dim() != 4 or tuple(logits.shape[:2]) != (batch, num_classes):
        raise ValueError(f"logits must be ({batch}, {num_classes}, H, W) for a batch of {batch} feature maps, "
                         f"got {_shape_or_type(logits)}")


def _channel_dropout(p) -> nn.Module:
    """``Dropout2d(p)``, or the identity for ``p == 0``; ``p`` must be a number in [0, 1)."""
    if not (is_real(p) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
    return nn.Dropout2d(float(p)) if p > 0 else nn.Identity()


def _check_knobs(k: dict) -> None:
    """``ValueError`` naming the first bad knob of ``k``; its integer knobs become Python ints in place."""
    choices = dict(em=("sinkhorn", "classic"), reduce=("logsumexp", "max"), m_step_scope=("batch", "seen"))
    for name, allowed in choices.items():
        if k[name] not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {k[name]!r}")
    for name in ("class_norm", "hard_assign", "correct_only", "normalize_means"):
        if not isinstance(k[name], bool):
            raise ValueError(f"{name} must be a bool, got {k[name]!r}")
    for name in ("memory_size", "update_interval", "sinkhorn_iters"):
        k[name] = check_int(name, k[name])
    k["max_per_component"] = check_int("max_per_component", k["max_per_component"], optional=True)
    for name in ("mean_momentum", "variance_momentum"):
        if not (is_real(k[name]) and 0.0 <= k[name] < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {k[name]!r}")
    for name in ("variance_floor", "sinkhorn_epsilon"):
        if not (is_finite_real(k[name]) and k[name] > 0):
            raise ValueError(f"{name} must be > 0 and finite, got {k[name]!r}")
    if not (is_finite_real(k["component_loss_weight"]) and k["component_loss_weight"] >= 0):
        raise ValueError(f"component_loss_weight must be >= 0 and finite, got {k['component_loss_weight']!r}")
