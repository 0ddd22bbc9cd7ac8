"""Encoder/decoder backbones and the blocks they are built from.

* ``FCAutoencoder``: FC1(784,512)-FC2(512,256)-FC3(256,128) | FC4(128,256)-FC5(256,512)-FC6(512,784),
  FC = Linear-BN-LeakyReLU, exactly as both papers 000/001 use on MNIST / Fashion-MNIST (the last block
  keeps its BN-LeakyReLU too, as written); AE, MemAE, Memorizer and RFTM share it (§4).
* ``ConvAutoencoder``: paper 001 §4.2's CIFAR network, Conv(a,b,3,2) = Conv-BN-LeakyReLU and
  DeConv(a,b,3,2) = ConvTranspose-BN-LeakyReLU; four stride-2 stages, so sides must divide by 16. DAAD's
  UNet (``models/daad.py``) is built from the same two blocks.
* ``ResNetEncoder``: AnoMem's BasicBlock ResNet (paper 002; ``models/anomem.py`` says how it is sized).

LeakyReLU uses PyTorch's default slope (0.01): the papers do not give one.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn as nn
import torch.nn.functional as F


def fc_block(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.LeakyReLU())


def conv_block(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.LeakyReLU())


def deconv_block(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(b), nn.LeakyReLU()
    )


class FCAutoencoder(nn.Module):
    """Fully connected AE on the flattened image; the latent is one vector per image."""

    def __init__(self, in_channels: int, image_size: int, hidden_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = (in_channels, image_size, image_size)
        dims = [math.prod(self.shape), *hidden_dims]
        self.encoder = nn.Sequential(*(fc_block(a, b) for a, b in pairwise(dims)))
        rev = dims[::-1]
        self.decoder = nn.Sequential(*(fc_block(a, b) for a, b in pairwise(rev)))
        self.latent_dim = dims[-1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.shape)


class ConvAutoencoder(nn.Module):
    """Convolutional AE; the latent is a [B, C, H/16, W/16] map."""

    def __init__(self, in_channels: int, image_size: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        stride = 2 ** len(widths)
        if image_size % stride:
            raise ValueError(f"conv backbone needs image_size divisible by {stride}, got {image_size}")
        chans = [in_channels, *widths]
        self.encoder = nn.Sequential(*(conv_block(a, b) for a, b in pairwise(chans)))
        rev = chans[::-1]
        self.decoder = nn.Sequential(*(deconv_block(a, b) for a, b in pairwise(rev)))
        self.latent_dim = widths[-1]
        self.latent_side = image_size // stride

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def conv_bn(a: int, b: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(b))


class BasicBlock(nn.Module):
    """He et al.'s two-conv residual block, with a 1×1 projection shortcut when the shape changes."""

    def __init__(self, a: int, b: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(a, b, 3, stride), nn.ReLU(), conv_bn(b, b, 3, 1))
        self.shortcut = conv_bn(a, b, 1, stride) if stride != 1 or a != b else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Stem + stages f^(1)…f^(S); returns the feature maps z^(s) after the requested stages."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], depths: tuple[int, ...], stem_stride: int):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, widths[0], 3, stem_stride), nn.ReLU())
        self.stages = nn.ModuleList()
        for s, (width, depth) in enumerate(zip(widths, depths)):
            a = widths[max(s - 1, 0)]
            blocks = [
                BasicBlock(a if i == 0 else width, width, 2 if s > 0 and i == 0 else 1) for i in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
        self.stem_stride = stem_stride

    def sides(self, image_size: int) -> list[int]:
        """Spatial side after each stage (3×3 convs, padding 1)."""
        side = (image_size - 1) // self.stem_stride + 1
        out = []
        for s in range(len(self.stages)):
            side = (side - 1) // 2 + 1 if s > 0 else side
            out.append(side)
        return out

    def forward(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        z, maps = self.stem(x), []
        for s, stage in enumerate(self.stages):
            z = stage(z)
            if s in taps:
                maps.append(z)
        return maps
