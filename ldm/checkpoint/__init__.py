"""Crash-safe, pickle-free training checkpoints for `accelerate` training loops.

The on-disk format and why it survives `kill -9` are described in `ldm/checkpoint/layout.py`. The package:

    layout.py    the format: directory and file names, the manifest, finding complete checkpoints
    codec.py     the tagged JSON that stores non-tensor state without pickle
    tensors.py   the safetensors files: durable writes, reads
    support.py   the supported distributed setups, the class names recorded for optimizers, schedulers, EMA
    save.py      `save_checkpoint`: write, seal, publish, rotate
    validate.py  checking a checkpoint, `resolve_resume`
    load.py      `load_checkpoint`: restore models, optimizers, schedulers, EMA, state and RNGs

Every function that takes an `accelerator` is collective: call it on all processes. Failures on any process are
shared with all others before anyone raises (`ldm.parallel.collective`), so no process is left waiting in a
collective.
"""

from __future__ import annotations

from ldm.checkpoint.layout import checkpoint_step, latest_checkpoint
from ldm.checkpoint.load import load_checkpoint
from ldm.checkpoint.save import save_checkpoint
from ldm.checkpoint.validate import resolve_resume

__all__ = ["checkpoint_step", "latest_checkpoint", "load_checkpoint", "resolve_resume", "save_checkpoint"]
