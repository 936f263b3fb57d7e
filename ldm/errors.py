"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback.

`UserError` is the error; `exit_on_user_error` wraps a command's entry point to print it; `OneLineArgumentParser`
is the argparse parser of every command, whose errors are `UserError`s too.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input from the user (a config, a path, an argument). The message says what is wrong and how to fix it."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors (a missing or unknown argument, a bad value) are a `UserError`:
    "<argparse's message> (see <prog> --help)", printed as one line with exit code 2 by `exit_on_user_error` like
    every other bad input, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def exit_on_user_error(main: F) -> F:
    """Wrap a command's entry point so a `UserError` prints `error: <message>` on stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _close_progress_bars()  # so the message starts on a line of its own
            print(f"error: {e}", file=sys.stderr, flush=True)
            _leave_process_group()
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


def _leave_process_group() -> None:
    """End a distributed run's process group before exiting, so gloo/NCCL threads do not abort the interpreter."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
