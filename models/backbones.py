"""Encoder/decoder backbones shared by AE, MemAE, Memorizer and RFTM (papers 000/001 §4).

* ``FCAutoencoder``: FC1(784,512)-FC2(512,256)-FC3(256,128) | FC4(128,256)-FC5(256,512)-FC6(512,784),
  FC = Linear-BN-LeakyReLU, exactly as both papers use on MNIST / Fashion-MNIST (the last block keeps its
  BN-LeakyReLU too, as written).
* ``ConvAutoencoder``: paper 001 §4.2's CIFAR network, Conv(a,b,3,2) = Conv-BN-LeakyReLU and
  DeConv(a,b,3,2) = ConvTranspose-BN-LeakyReLU; four stride-2 stages, so sides must divide by 16.

LeakyReLU uses PyTorch's default slope (0.01): the papers do not give one.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn as nn


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
