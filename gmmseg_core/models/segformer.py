"""SegFormer-style network: a hierarchical Mix Transformer encoder and an all-MLP decoder.

Stage ``i`` embeds overlapping patches (strided convolution), then runs blocks of efficient self-attention
(keys and values from a map reduced ``sr_ratio`` times per side) and a Mix-FFN (MLP with a depth-wise 3x3
convolution, which replaces positional encodings). The decoder projects the four stages to one width,
upsamples them to stride 4, concatenates and fuses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmmseg_core._checks import check_int
from gmmseg_core.models.fcn import check_size, positive_ints

SIZES = {  # tiny trains on a CPU; small ~ MiT-B0; base ~ MiT-B2
    "tiny": dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), heads=(1, 1, 2, 4), decoder_dim=64),
    "small": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8), decoder_dim=256),
    "base": dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), heads=(1, 2, 5, 8), decoder_dim=768),
}
SR_RATIOS = (8, 4, 2, 1)


class EfficientSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dims must be divisible by heads, got dim {dim} and heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio) if sr_ratio > 1 else None
        self.sr_norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        kv = x
        if self.sr is not None:
            r = self.sr.stride[0]
            # pad to a multiple of the reduction so that small maps (and odd sizes) still reduce
            grid = F.pad(x.transpose(1, 2).reshape(B, C, h, w), (0, -w % r, 0, -h % r))
            kv = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(kv).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MixFFN(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.dw = nn.Conv2d(dim * ratio, dim * ratio, 3, 1, 1, groups=dim * ratio)
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)
        B, N, C = x.shape
        x = self.dw(x.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), EfficientSelfAttention(dim, heads, sr_ratio)
        self.norm2, self.ffn = nn.LayerNorm(dim), MixFFN(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class Stage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, heads: int, sr_ratio: int, patch: int, stride: int):
        super().__init__()
        self.embed = nn.Conv2d(cin, dim, patch, stride, patch // 2)   # overlapping patch embedding
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([Block(dim, heads, sr_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        B, C, h, w = x.shape
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            x = block(x, h, w)
        return self.norm(x).transpose(1, 2).reshape(B, C, h, w)


class SegFormerBackbone(nn.Module):
    """Mix Transformer encoder + all-MLP decoder; features ``(B, decoder_dim, H/4, W/4)``.

    Parameters
    ----------
    size : {"tiny", "small", "base"}
        Preset; explicit ``dims``, ``depths``, ``heads`` (4 positive ints each) and ``decoder_dim`` (a positive
        int) override it (None: the preset's).
    width : int, optional
        Shortcut: ``dims = width * (1, 2, 4, 8)`` and ``decoder_dim = 4 * width`` (heads 1, 1, 2, 4).
    """

    def __init__(self, size: str = "tiny", width: int | None = None, dims=None, depths=None, heads=None,
                 decoder_dim: int | None = None):
        super().__init__()
        check_size(size, SIZES)
        cfg = dict(SIZES[size])
        width = check_int("width", width, optional=True)
        if width is not None:
            cfg.update(dims=tuple(width * m for m in (1, 2, 4, 8)), heads=(1, 1, 2, 4), decoder_dim=4 * width)
        dims, depths = positive_ints("dims", dims) or cfg["dims"], positive_ints("depths", depths) or cfg["depths"]
        heads = positive_ints("heads", heads) or cfg["heads"]
        decoder_dim = check_int("decoder_dim", decoder_dim, optional=True) or cfg["decoder_dim"]
        cins = (3,) + tuple(dims[:3])
        self.stages = nn.ModuleList([
            Stage(cins[i], dims[i], depths[i], heads[i], SR_RATIOS[i], 7 if i == 0 else 3, 4 if i == 0 else 2)
            for i in range(4)])
        self.project = nn.ModuleList([nn.Conv2d(d, decoder_dim, 1) for d in dims])  # per-pixel linear layers
        self.fuse = nn.Sequential(nn.Conv2d(4 * decoder_dim, decoder_dim, 1, bias=False),
                                  nn.BatchNorm2d(decoder_dim), nn.ReLU(inplace=True))
        self.out_channels = decoder_dim

    def forward(self, images: Tensor) -> Tensor:
        x, feats = images, []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        size = feats[0].shape[-2:]
        outs = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) if i else p(f)
                for i, (p, f) in enumerate(zip(self.project, feats))]
        return self.fuse(torch.cat(outs[::-1], 1))
