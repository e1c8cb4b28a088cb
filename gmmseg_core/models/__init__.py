"""Segmentation networks: feature extractors and ``build_model``.

``build_model(arch, head, num_classes=...)`` returns a :class:`SegmentationModel` (backbone + head). In-house
architectures, each with ``size="tiny" | "small" | "base"`` and a ``width`` override (``tiny`` trains on a CPU
at 64x128 images, the others are GPU-sized):

``fcn``            dilated residual encoder (output stride 8) + FCN head convolutions; features at stride 8
``deeplabv3plus``  dilated residual encoder (output stride 16) + ASPP + low-level skip; features at stride 4
``segformer``      Mix Transformer encoder (4 stages, efficient attention, Mix-FFN) + all-MLP decoder; stride 4

and ``"smp:<Architecture>:<encoder>"`` for any segmentation-models-pytorch model (``encoder_weights`` defaults
to ``"imagenet"``; pass None offline).
"""

from __future__ import annotations

import inspect

from torch import nn

from gmmseg_core.heads import GMMHead, SoftmaxHead
from gmmseg_core.models.base import SegmentationModel
from gmmseg_core.models.deeplab import DeepLabV3PlusBackbone
from gmmseg_core.models.fcn import FCNBackbone
from gmmseg_core.models.segformer import SegFormerBackbone

ARCHS: dict[str, type[nn.Module]] = {
    "fcn": FCNBackbone,
    "deeplabv3plus": DeepLabV3PlusBackbone,
    "segformer": SegFormerBackbone,
}
HEADS = ("gmm", "softmax")

__all__ = ["ARCHS", "HEADS", "SegmentationModel", "build_backbone", "build_model", "check_arch",
           "check_model_arguments"]


def check_arch(arch) -> None:
    """Raise ``ValueError`` unless ``arch`` names an in-house architecture or has the form
    ``"smp:<Architecture>:<encoder>"`` (whether smp knows that architecture is checked when it is built)."""
    if isinstance(arch, str) and arch.startswith("smp:"):
        from gmmseg_core.models.smp_adapter import parse_smp_arch

        parse_smp_arch(arch)
    elif not (isinstance(arch, str) and arch in ARCHS):
        raise ValueError(f"arch must be one of {sorted(ARCHS)} or 'smp:<Architecture>:<encoder>', got {arch!r}")


def _check_keywords(target, given: dict, what: str, positional: int) -> None:
    """``ValueError`` listing the keys of ``given`` that ``target`` does not take (after ``positional`` leading
    parameters filled by the caller); nothing is checked for a target that accepts ``**kwargs``."""
    params = list(inspect.signature(target).parameters.values())[positional:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"{what} {unknown} are not arguments of {getattr(target, '__name__', target)}; "
                         f"it takes {accepted}")


def check_model_arguments(arch: str, head: str, head_kwargs: dict | None = None,
                          model_kwargs: dict | None = None) -> None:
    """Raise ``ValueError`` for argument names that ``build_model(arch, head, ...)`` would reject, without
    building anything: keys of ``head_kwargs`` that the head does not take (e.g. ``variant`` for the softmax
    head) and of ``model_kwargs`` that the backbone does not take (an smp backbone's are checked against its smp
    architecture when the model is built, which needs smp imported)."""
    check_arch(arch)
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    _check_keywords(GMMHead if head == "gmm" else SoftmaxHead, head_kwargs or {}, "head_kwargs", 2)
    if not arch.startswith("smp:"):
        _check_keywords(ARCHS[arch], model_kwargs or {}, "model_kwargs", 0)


def build_backbone(arch: str, **kw) -> nn.Module:
    """The feature extractor named ``arch`` (see the module docstring); ``kw`` go to its constructor."""
    check_arch(arch)
    if arch.startswith("smp:"):
        from gmmseg_core.models.smp_adapter import build_smp_backbone

        return build_smp_backbone(arch, **kw)
    return ARCHS[arch](**kw)


def build_model(arch: str, head: str = "gmm", *, num_classes: int, head_kwargs: dict | None = None,
                device=None, **kw) -> SegmentationModel:
    """A segmentation network: backbone ``arch`` followed by a ``head`` classifier.

    Parameters
    ----------
    arch : str
        ``"fcn"``, ``"deeplabv3plus"``, ``"segformer"`` or ``"smp:<Architecture>:<encoder>"``.
    head : {"gmm", "softmax"}
    num_classes : int
    head_kwargs : dict, optional
        Passed to ``GMMHead`` (``embed_dim``, ``num_components``, ``variant``, the knobs and ``dropout``) or
        ``SoftmaxHead`` (``dropout``).
    device : str or torch.device, optional
        Where to put the model (default cpu).
    **kw
        Passed to the backbone (``size``, ``width``, ``depths``, ...; ``encoder_weights`` for smp).

    Returns
    -------
    SegmentationModel
    """
    check_model_arguments(arch, head, head_kwargs, kw)
    backbone = build_backbone(arch, **kw)
    cls = GMMHead if head == "gmm" else SoftmaxHead
    model = SegmentationModel(backbone, cls(backbone.out_channels, num_classes, **(head_kwargs or {})))
    model.arch = arch
    return model.to(device) if device is not None else model
