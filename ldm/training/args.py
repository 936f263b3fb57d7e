"""The training scripts' command line: `--config FILE [--resume latest|PATH] [key=value ...]` -> a validated config."""

from __future__ import annotations

import sys
from typing import TypeVar

from ldm.config import load_config
from ldm.errors import OneLineArgumentParser

T = TypeVar("T")


def parse_train_args(config_cls: type[T], argv: list[str] | None, description: str) -> tuple[T, str | None]:
    """`--config FILE [--resume latest|PATH] [key=value ...]` -> (validated config, resume)."""
    parser = OneLineArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (values only); defaults apply to keys it leaves out")
    parser.add_argument("--resume", default=None, help="'latest' (the newest complete checkpoint, if any) or a path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=200 data.resolution=64")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return load_config(config_cls, args.config, args.overrides), args.resume
