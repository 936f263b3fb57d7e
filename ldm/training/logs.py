"""Log lines of the training scripts: INFO from the main process, warnings from the others, tagged with the rank."""

from __future__ import annotations

import logging
import sys


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
