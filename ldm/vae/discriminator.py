"""PatchGAN discriminator: a stack of strided 4x4 convolutions that scores overlapping patches as real or fake.

The layout follows pix2pix's N-layer discriminator (Isola et al. 2017, https://arxiv.org/abs/1611.07004), which the
LDM autoencoders use with 3 layers and 64 base channels. Each output logit sees a receptive field of 70 px (3 layers).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["group", "batch", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    # GroupNorm by default: unlike BatchNorm it does not mix real and fake images that share a forward pass, and it
    # has no running statistics to keep in step across processes.
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: Norm = "group"):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = base_channels
        # num_layers - 1 more stride-2 blocks, then one stride-1 block; width doubles each time, capped at 8x base.
        for i in range(1, num_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=norm == "none"),
                _norm(norm, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))  # one logit per patch
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 3, H, W) -> (B, 1, h, w) patch logits


def _init_weights(module: nn.Module) -> None:
    # N(0, 0.02) convolutions and N(1, 0.02) norm scales, as in DCGAN/pix2pix
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
