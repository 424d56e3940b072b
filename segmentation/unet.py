"""A 3D U-Net in plain PyTorch (no prints, no rank logic, no I/O)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet3D", "ConvBlock", "ResBlock", "NORMS"]

NORMS = ("instance", "batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvBlock(nn.Sequential):
    """(conv 3x3x3 -> norm -> LeakyReLU) x 2, with optional channel dropout between the two."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float):
        layers: list[nn.Module] = [
            nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False),
            _norm(norm, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        layers += [nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False), _norm(norm, out_ch), nn.LeakyReLU(0.01, True)]
        super().__init__(*layers)


class ResBlock(nn.Module):
    """A residual `ConvBlock` (He 2016; nnU-Net's ResEnc): act(norm(conv(act(norm(conv x)))) + proj x)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float):
        super().__init__()
        self.body = nn.Sequential(*list(ConvBlock(in_ch, out_ch, norm, dropout))[:-1])  # activation after the sum
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv3d(in_ch, out_ch, 1, bias=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class UNet3D(nn.Module):
    """Encoder-decoder with skip connections (Ronneberger 2015; Cicek 2016), nnU-Net-style blocks.

    Encoder level `i` has `min(features * 2**i, max_features)` channels; `depth` max-pool downsamplings lead to the
    bottleneck; the decoder upsamples with transposed convolutions and concatenates the skip of the same level.

    Shapes:
        input `(B, in_channels, X, Y, Z)`, any sizes: inputs are padded internally (replicating the border) to a
        multiple of `2**depth` and the output is cropped back, so odd sizes like `(2, 1, 33, 34, 35)` work.
        output `(B, out_channels, X, Y, Z)` logits. In training mode with `deep_supervision=True` the output is a
        list `[full, 1/2, 1/4, ...]` of `depth` logit maps, the k-th of size `ceil(size / 2**k)` per axis.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: 1 for a sigmoid foreground map, C for a C-class softmax.
        features: channels of the first level.
        depth: number of downsamplings (levels = depth + 1).
        norm: "instance" (default, as nnU-Net), "batch" or "group".
        dropout: Dropout3d probability inside every block (0: none).
        deep_supervision: add 1x1x1 heads on the lower decoder levels (training output becomes a list).
        max_features: cap on channels per level (nnU-Net uses 320).
        residual: residual blocks (`ResBlock`) instead of plain ones.
        top_features: channels of the full-resolution level only (0: `features`); fewer makes the full
            resolution, where most of the FLOPs are, cheap while the lower levels keep their width.
        stem: 2 puts a strided convolution first and a transposed one last, so every block runs at half resolution
            or below (MONAI's `UNet` layout: most of a plain U-Net's FLOPs are its full-resolution blocks); the
            output keeps the input's size, and deep supervision's maps keep their sizes. 1: none.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 16,
        depth: int = 4,
        norm: str = "instance",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        max_features: int = 320,
        residual: bool = False,
        top_features: int = 0,
        stem: int = 1,
    ):
        super().__init__()
        if stem not in (1, 2):
            raise ValueError(f"stem must be 1 or 2, got {stem}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        ch = [min(features * 2**i, max_features) for i in range(depth + 1)]
        ch[0] = top_features or ch[0]
        self.depth, self.deep_supervision, self.shift = depth, deep_supervision, stem - 1
        block = ResBlock if residual else ConvBlock
        first_in = in_channels
        if stem == 2:
            self.stem = nn.Sequential(
                nn.Conv3d(in_channels, ch[0], 3, stride=2, padding=1, bias=False),
                _norm(norm, ch[0]),
                nn.LeakyReLU(0.01),
            )
            self.unstem = nn.Sequential(
                nn.ConvTranspose3d(ch[0], ch[0], 2, stride=2), _norm(norm, ch[0]), nn.LeakyReLU(0.01)
            )
            first_in = ch[0]
        self.encoders = nn.ModuleList(
            [block(first_in if i == 0 else ch[i - 1], ch[i], norm, dropout) for i in range(depth + 1)]
        )
        self.pool = nn.MaxPool3d(2)
        # Decoder level i (from the bottom): upsample ch[i+1] -> ch[i], concat skip ch[i], block 2*ch[i] -> ch[i].
        self.ups = nn.ModuleList([nn.ConvTranspose3d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth)])
        self.decoders = nn.ModuleList([block(2 * ch[i], ch[i], norm, dropout) for i in range(depth)])
        self.head = nn.Conv3d(ch[0], out_channels, 1)
        # One head per map at 1/2 .. 1/2**(depth-1): decoder level i is at 1/2**(i + shift).
        self.ds_heads = nn.ModuleList(
            [nn.Conv3d(ch[k - self.shift], out_channels, 1) for k in range(1, depth)] if deep_supervision else []
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[2:]
        m = 2 ** (self.depth + self.shift)
        pad = [(-s) % m for s in size]
        if any(pad):
            # F.pad takes (last dim first) (left, right) pairs; pad at the far end only.
            x = F.pad(x, [p for s in reversed(pad) for p in (0, s)], mode="replicate")
        if self.shift:
            x = self.stem(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        outputs = []
        for i in reversed(range(self.depth)):
            x = self.decoders[i](torch.cat([self.ups[i](x), skips[i]], dim=1))
            k = i + self.shift  # this map is at 1/2**k
            if self.training and self.deep_supervision and 1 <= k < self.depth:
                outputs.append(self.ds_heads[k - 1](x))
        if self.shift:
            x = self.unstem(x)
        out = self.head(x)[(..., *[slice(0, s) for s in size])]
        if not (self.training and self.deep_supervision):
            return out
        # Lower-resolution maps cropped to ceil(size / 2**k), the grid of a padded-then-pooled input.
        levels = range(self.depth - 1, 0, -1)  # outputs were collected from the coarsest level up
        low = [o[(..., *[slice(0, -(-s // 2**k)) for s in size])] for k, o in zip(levels, outputs)]
        return [out, *reversed(low)]
