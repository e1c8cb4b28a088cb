"""FCN-style network: a dilated residual encoder (output stride 8) and FCN head convolutions.

The encoder is a small ResNet (basic blocks) whose last two stages trade stride for dilation, as in the
dilated ResNets of FCN/PSPNet/DeepLab; the ``DeepLabV3Plus`` backbone reuses it with output stride 16.
"""

from __future__ import annotations

from torch import Tensor, nn

from gmmseg_core._checks import check_int, is_int

SIZES = {  # width (channels of the first stage) and blocks per stage
    "tiny": dict(width=16, depths=(1, 1, 1, 1)),
    "small": dict(width=32, depths=(2, 2, 2, 2)),
    "base": dict(width=64, depths=(3, 4, 6, 3)),
}


def positive_ints(name: str, value, length: int | None = 4, optional: bool = True) -> tuple[int, ...] | None:
    """``value`` as a tuple of ints; ``ValueError`` naming ``name`` unless it is a list or tuple of ``length``
    (None: any number, at least one) positive ints (or None when ``optional``)."""
    if optional and value is None:
        return None
    if not (isinstance(value, (list, tuple)) and (len(value) == length if length else len(value) > 0)
            and all(is_int(v) and v > 0 for v in value)):
        count = f"{length}" if length else "a sequence of"
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{count} positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def check_size(size, sizes) -> None:
    """``ValueError`` unless ``size`` names a preset of ``sizes``."""
    if not (isinstance(size, str) and size in sizes):
        raise ValueError(f"size must be one of {list(sizes)}, got {size!r}")


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, dilation, dilation=dilation, bias=False),
                                   nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DilatedResNet(nn.Module):
    """Residual encoder returning four feature maps (strides 4, 8, and 8 or 16 for the last two).

    Parameters
    ----------
    width : int
        Channels of stage 1; stages have ``width * (1, 2, 4, 8)``.
    depths : sequence of 4 ints
        Basic blocks per stage.
    output_stride : {8, 16}
        8 dilates stages 3 and 4 (rates 2, 4); 16 strides stage 3 and dilates stage 4 (rate 2).
    """

    def __init__(self, width: int = 16, depths=(1, 1, 1, 1), output_stride: int = 8):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        width = check_int("width", width)
        depths = positive_ints("depths", depths, optional=False)
        self.stem = nn.Sequential(conv_bn_relu(3, width, 3, 2), conv_bn_relu(width, width, 3, 1),
                                  nn.MaxPool2d(3, 2, 1))
        strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if output_stride == 8 else ((1, 2, 2, 1), (1, 1, 1, 2))
        chans = [width * m for m in (1, 2, 4, 8)]
        stages, cin = [], width
        for cout, depth, stride, dil in zip(chans, depths, strides, dilations):
            blocks = [BasicBlock(cin, cout, stride, dil)] + [BasicBlock(cout, cout, 1, dil) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = chans

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class FCNBackbone(nn.Module):
    """Dilated ResNet (output stride 8) + FCN head convolutions; features ``(B, out_channels, H/8, W/8)``.

    Parameters
    ----------
    size : {"tiny", "small", "base"}
        Preset for ``width`` and ``depths`` (explicit values override it).
    width, depths : see ``DilatedResNet``
        None: the preset's.
    channels : int, optional
        Output channels (default ``4 * width``).

    Notes
    -----
    The head is two 3x3 conv-BN-ReLU layers on the stage-4 map (mmseg's ``FCNHead`` with ``num_convs=2``), without
    mmseg's ``concat_input`` (a third 3x3 convolution over the stage-4 map concatenated with their output).
    """

    def __init__(self, size: str = "tiny", width: int | None = None, depths=None, channels: int | None = None):
        super().__init__()
        check_size(size, SIZES)
        width = check_int("width", width, optional=True) or SIZES[size]["width"]
        depths = positive_ints("depths", depths) or SIZES[size]["depths"]
        channels = check_int("channels", channels, optional=True)
        self.encoder = DilatedResNet(width, depths, output_stride=8)
        cin = self.encoder.channels[-1]
        self.out_channels = channels or 4 * width
        self.fcn = nn.Sequential(conv_bn_relu(cin, self.out_channels), conv_bn_relu(self.out_channels, self.out_channels))

    def forward(self, images: Tensor) -> Tensor:
        return self.fcn(self.encoder(images)[-1])
