"""``SegmentationModel``: a feature extractor (backbone) followed by a swappable classifier head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmmseg_core.heads import IGNORE_INDEX


class SegmentationModel(nn.Module):
    """Backbone ``images (B, 3, H, W) -> features (B, Cf, h, w)`` followed by a head ``-> logits (B, C, h, w)``.

    Parameters
    ----------
    backbone : nn.Module
        Has an ``out_channels`` attribute (``Cf``).
    head : nn.Module
        ``SoftmaxHead`` or ``GMMHead`` (anything with their interface).
    ignore_index : int
        Label excluded from the cross-entropy.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ignore_index = ignore_index

    @property
    def is_generative(self) -> bool:
        """True when the head models ``p(x|c)`` (then ``class_log_likelihood`` is available)."""
        return bool(getattr(self.head, "is_generative", False))

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @staticmethod
    def _upsample(maps: Tensor, size) -> Tensor:
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: Tensor, labels: Tensor | None = None):
        """Logits ``(B, C, H, W)`` at the input size (bilinear upsampling of the head's output).

        With ``labels`` this is ``forward_train(images, labels)`` (its dict), so that a
        ``DistributedDataParallel`` wrapper, which only intercepts ``forward``, can run the training pass.
        """
        if labels is not None:
            return self.forward_train(images, labels)
        return self._upsample(self.head(self.backbone(images)), images.shape[-2:])

    def forward_train(self, images: Tensor, labels: Tensor) -> dict:
        """One training forward pass and its loss.

        Parameters
        ----------
        images : Tensor (B, 3, H, W)
        labels : LongTensor (B, H', W')
            ``ignore_index`` marks unlabelled pixels; the logits are upsampled to ``H' x W'`` for the loss.

        Returns
        -------
        dict
            ``loss`` (scalar, ``ce + aux``, differentiable; ``ce`` is averaged over the labelled pixels, whereas
            mmseg before 0.23, on which the released GMMSeg code builds, divides by every pixel, ignored ones
            included), ``logits`` (B, C, H, W), ``features``
            (B, Cf, h, w), ``ce`` (detached cross-entropy), ``aux`` (detached extra loss of the head, 0 for
            softmax and the paper GMM).
        """
        features = self.backbone(images)
        if self.is_generative:
            small, comp = self.head(features, return_component_logp=True)
            aux = self.head.extra_loss(features, labels, component_logp=comp)
        else:
            small = self.head(features)
            aux = self.head.extra_loss(features, labels)
        logits = self._upsample(small, images.shape[-2:])
        target = labels.to(logits.device).long()
        same_size = tuple(target.shape[-2:]) == tuple(images.shape[-2:])
        loss_logits = logits if same_size else self._upsample(small, target.shape[-2:])
        if bool((target != self.ignore_index).any()):
            ce = F.cross_entropy(loss_logits, target, ignore_index=self.ignore_index)
        else:
            ce = loss_logits.sum() * 0.0
        return dict(loss=ce + aux, logits=logits, features=features, ce=ce.detach(), aux=aux.detach())

    def class_log_likelihood(self, images: Tensor) -> Tensor:
        """``log p(x|c)`` ``(B, C, H, W)`` at the input size (generative heads only).

        Raises
        ------
        TypeError
            For a discriminative (softmax) head.
        """
        if not self.is_generative:
            raise TypeError(f"class_log_likelihood needs a generative head (head='gmm'); this model has a "
                            f"{type(self.head).__name__}, whose logits are not class-conditional densities")
        return self._upsample(self.head.class_log_likelihood(self.backbone(images)), images.shape[-2:])

    @torch.no_grad()
    def update_head(self, features: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        """The head's EM bookkeeping after the optimiser step (no-op for a softmax head)."""
        self.head.update(features, labels, logits)
