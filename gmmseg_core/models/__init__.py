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

__all__ = ["ARCHS", "HEADS", "SegmentationModel", "build_backbone", "build_model", "check_arch"]


def check_arch(arch) -> None:
    """Raise ``ValueError`` unless ``arch`` names an in-house architecture or has the form
    ``"smp:<Architecture>:<encoder>"`` (whether smp knows that architecture is checked when it is built)."""
    if isinstance(arch, str) and arch.startswith("smp:"):
        from gmmseg_core.models.smp_adapter import parse_smp_arch

        parse_smp_arch(arch)
    elif not (isinstance(arch, str) and arch in ARCHS):
        raise ValueError(f"arch must be one of {sorted(ARCHS)} or 'smp:<Architecture>:<encoder>', got {arch!r}")


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
        Passed to ``GMMHead`` (``embed_dim``, ``num_components``, ``variant`` and the knobs) or ``SoftmaxHead``
        (``dropout``).
    device : str or torch.device, optional
        Where to put the model (default cpu).
    **kw
        Passed to the backbone (``size``, ``width``, ``depths``, ...; ``encoder_weights`` for smp).

    Returns
    -------
    SegmentationModel
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    backbone = build_backbone(arch, **kw)
    cls = GMMHead if head == "gmm" else SoftmaxHead
    model = SegmentationModel(backbone, cls(backbone.out_channels, num_classes, **(head_kwargs or {})))
    model.arch = arch
    return model.to(device) if device is not None else model
