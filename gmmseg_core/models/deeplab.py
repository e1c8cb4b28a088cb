"""DeepLabV3+: dilated residual encoder (output stride 16), ASPP, and a decoder with a low-level skip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmmseg_core._checks import check_int
from gmmseg_core.models.fcn import SIZES, DilatedResNet, check_size, conv_bn_relu, positive_ints

ASPP_RATES = {"tiny": (2, 4, 6), "small": (3, 6, 9), "base": (6, 12, 18)}


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and image pooling."""

    def __init__(self, cin: int, cout: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, 1, r) for r in rates])
        # no BatchNorm on the pooled branch: a 1x1 map with batch size 1 has no batch statistics
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3PlusBackbone(nn.Module):
    """Features ``(B, out_channels, H/4, W/4)``: ASPP on stride-16 features, upsampled and fused with stage 1.

    Parameters
    ----------
    size : {"tiny", "small", "base"}
        Preset for ``width``, ``depths`` and ``aspp_rates``.
    width, depths : see ``DilatedResNet``
        None: the preset's.
    channels : int, optional
        ASPP and decoder channels (default ``4 * width``).
    aspp_rates : tuple of positive ints, optional
        Dilation rates of the 3x3 ASPP branches (default: the preset's 3; ``base`` has DeepLabV3+'s 6, 12, 18
        at output stride 16, the smaller presets scale them down for smaller images).

    Notes
    -----
    ASPP and the decoder use plain convolutions where DeepLabV3+ makes them depth-wise separable (a cost saving
    that does not change what they see). The low-level skip projects stage 1 (stride 4) to
    ``max(8, channels // 4)`` channels with a 1x1 convolution: 64 of 256 where DeepLabV3+ uses 48. A branch whose
    rate is at least the map's height (or width) reads only zero padding off-centre in that direction: on the
    4 x 8 stride-16 map of a 64 x 128 image, the ``tiny`` rates 4 and 6 act as 1 x 3 convolutions.
    """

    def __init__(self, size: str = "tiny", width: int | None = None, depths=None, channels: int | None = None,
                 aspp_rates=None):
        super().__init__()
        check_size(size, SIZES)
        width = check_int("width", width, optional=True) or SIZES[size]["width"]
        depths = positive_ints("depths", depths) or SIZES[size]["depths"]
        channels = check_int("channels", channels, optional=True)
        aspp_rates = positive_ints("aspp_rates", aspp_rates, length=None) or ASPP_RATES[size]
        self.encoder = DilatedResNet(width, depths, output_stride=16)
        self.out_channels = channels or 4 * width
        self.aspp = ASPP(self.encoder.channels[-1], self.out_channels, aspp_rates)
        low = max(8, self.out_channels // 4)
        self.skip = conv_bn_relu(self.encoder.channels[0], low, 1)
        self.fuse = nn.Sequential(conv_bn_relu(self.out_channels + low, self.out_channels),
                                  conv_bn_relu(self.out_channels, self.out_channels))

    def forward(self, images: Tensor) -> Tensor:
        feats = self.encoder(images)
        low = self.skip(feats[0])
        high = F.interpolate(self.aspp(feats[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, low], 1))
