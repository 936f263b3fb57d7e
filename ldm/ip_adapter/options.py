"""The command line's IP-Adapter options (`ldm-generate`, also for prompt lists) -> the request's units.

    --ip-adapter MODEL --ip-image FILE [--ip-scale S] [--ip-image-encoder DIR]     (each repeatable)

Several adapters stack (diffusers' multi-adapter form); --ip-image, --ip-scale and --ip-image-encoder are given once
(for every adapter) or once per adapter, in the adapters' order. A --from-png replay takes the PNG's adapters and
scales unless --ip-adapter is given, and needs --ip-image again: the image prompt is not stored in the PNG;
`--ip-adapter ''` replays it without them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

from ldm.errors import UserError
from ldm.image_io import open_image
from ldm.ip_adapter.unit import SCALE, IPAdapterUnit

OPTIONS = ("ip_image", "ip_scale", "ip_image_encoder")  # what applies only with adapters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("IP-Adapter (image prompts; each option repeatable, in the adapters' order)")
    g.add_argument("--ip-adapter", action="append", default=None, metavar="MODEL",
                   help="an IP-Adapter file (plain, Plus or Full; h94/IP-Adapter's .safetensors, or its .bin read as "
                   "tensors only) or a directory holding one; repeat to stack several. Recorded in the PNG as "
                   "'IP-Adapter: NAME [hash]'")
    g.add_argument("--ip-image", action="append", default=None, metavar="FILE",
                   help="the image prompt: once for every adapter, or once per adapter")
    g.add_argument("--ip-scale", action="append", type=float, default=None, metavar="S",
                   help=f"weight of the image prompt in every cross-attention (default {SCALE:g}; 0.5-0.7 leaves the "
                   "text more say)")
    g.add_argument("--ip-image-encoder", action="append", default=None, metavar="DIR",
                   help="the CLIP vision model directory the adapter needs (default: an image_encoder/ folder next "
                   "to the adapter file, else in the model's directory)")


def ip_adapter_units(args: argparse.Namespace, replayed: Sequence[IPAdapterUnit] = (),
                     png: str | None = None) -> tuple[IPAdapterUnit, ...] | None:
    """The units the options give (on top of a --from-png's `replayed` ones), images decoded; None when there are
    none. Every bad combination is a one-line `UserError`."""
    names = list(args.ip_adapter or [])
    given = [f"--{o.replace('_', '-')}" for o in OPTIONS if getattr(args, o)]
    if names == [""] or (not names and not replayed):  # --ip-adapter '': a --from-png replayed without its adapters
        if given:
            raise UserError(f"{', '.join(given)} only apply with --ip-adapter MODEL")
        return () if names else None
    if "" in names:
        raise UserError("--ip-adapter '' (replay without the PNG's IP-Adapters) cannot be given with other adapters")
    if not names:  # the PNG's adapters, with their recorded scales and hashes
        units = list(replayed)
    else:
        units = [IPAdapterUnit(name) for name in names]
    images = _spread(args.ip_image, len(units), "--ip-image")
    if images is None:
        if not names:
            listed = ", ".join(f"'{u.model}'" for u in units)
            raise UserError(f"'{png}' was made with the IP-Adapter(s) {listed}: pass --ip-image FILE to replay it "
                            "(the image prompt is not stored in the PNG)")
        raise UserError("--ip-adapter needs --ip-image FILE (the image prompt)")
    scales = _spread(args.ip_scale, len(units), "--ip-scale")
    decoded: dict[str, object] = {}
    out = []
    for i, unit in enumerate(units):
        if images[i] not in decoded:
            decoded[images[i]] = open_image(images[i], f"--ip-image '{images[i]}'")
        out.append(replace(unit, image=decoded[images[i]], scale=unit.scale if scales is None else scales[i]))
    return tuple(out)


def _spread(values: list | None, n: int, option: str) -> list | None:
    """An option given once (for all n adapters) or n times -> n values; None when not given."""
    if not values:
        return None
    if len(values) not in (1, n):
        raise UserError(f"{option} was given {len(values)} times for {n} IP-Adapter(s): give it once (for all) or "
                        "once per adapter")
    return list(values) * n if len(values) == 1 else list(values)
