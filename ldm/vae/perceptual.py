"""LPIPS perceptual distance from the `lpips` package, with the backbone's pretraining an explicit choice.

`lpips` ships its learned linear heads, but its vgg/alex backbone comes from torchvision, whose ImageNet weights are
downloaded on first use. Offline (and in tests) the backbone can be left random: the distance is then still a
differentiable feature-space distance, but not the calibrated perceptual metric, so we say so loudly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import urllib.error
import warnings
from typing import Literal

import lpips
import torch
from torch import nn

from ldm.errors import UserError

log = logging.getLogger(__name__)


def build_lpips(net: Literal["vgg", "alex"] = "vgg", pretrained_backbone: bool = True) -> nn.Module:
    """A frozen LPIPS module in eval mode. Its parameters take no gradient; gradients still flow to its inputs."""
    try:
        # lpips prints to stdout when it loads its heads; keep our logs clean
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation notes about `pretrained=`
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise UserError(
            f"LPIPS needs torchvision's pretrained {net} weights, which could not be loaded ({e}); "
            f"download them once into {torch.hub.get_dir()}/checkpoints, or set "
            "loss.lpips_pretrained_backbone=false to use a random backbone (for tests and offline runs only)"
        ) from None
    if not pretrained_backbone:
        log.warning(
            "LPIPS uses a RANDOM %s backbone (loss.lpips_pretrained_backbone=false): the perceptual loss and the "
            "LPIPS metric are NOT the calibrated LPIPS; use pretrained weights for real training",
            net,
        )
    model.eval().requires_grad_(False)
    return model
