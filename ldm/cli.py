"""Command-line plumbing shared by the training scripts."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TypeVar

from ldm.config import load_config

T = TypeVar("T")


def parse_train_args(config_cls: type[T], argv: list[str] | None, description: str) -> tuple[T, str | None]:
    """`--config FILE [--resume latest|PATH] [key=value ...]` -> (validated config, resume)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (values only); defaults apply to keys it leaves out")
    parser.add_argument("--resume", default=None, help="'latest' (the newest complete checkpoint, if any) or a path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=200 data.resolution=64")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return load_config(config_cls, args.config, args.overrides), args.resume


def setup_logging(is_main_process: bool, rank: int) -> None:
    """INFO on the main process, warnings and errors from the others, each line tagged with its rank."""
    handler = _ProgressAwareHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if is_main_process else logging.WARNING, handlers=[handler], force=True)
    for noisy in ("datasets", "huggingface_hub", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # its "Downloading data" bars for local files only confuse


class _ProgressAwareHandler(logging.StreamHandler):
    """Writes log lines to stderr through tqdm, so they do not land in the middle of a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)
