"""Run a training script under accelerate's DeepSpeed integration with CPU processes (gloo): for tests without GPUs.

    accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml --num_processes 2 --mixed_precision no \
        tests/deepspeed_on_cpu.py train/train_ldm.py ARGS... train.cpu=true

DeepSpeed itself trains on CPU (its CPU accelerator falls back to gloo), but accelerate sets DeepSpeed up only when the
Accelerator is not asked for the CPU, and without a GPU that leaves every process believing it is alone. This shim
lets the Accelerator do its normal multi-process CPU setup and then switches it to DeepSpeed the way accelerate's own
setup does: the launch's DeepSpeed plugin (from the same environment variables), its mixed precision, no autocast.
So the script's DeepSpeed paths (engine, ZeRO partitions, gathered checkpoints and export) really run here; only the
launch plumbing differs from a GPU run.
"""

from __future__ import annotations

import runpy
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

_original_init = accelerate.Accelerator.__init__


def _deepspeed_init(self, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    state = self.state
    requested = state._mixed_precision
    PartialState().distributed_type = state.distributed_type = DistributedType.DEEPSPEED
    plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables the launcher set
    plugin.set_mixed_precision(requested)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state._mixed_precision = "no"  # as AcceleratorState does under DeepSpeed: the engine handles precision
    self.native_amp = False


def _no_shared_memory_op():
    """DeepSpeed's CPU communicator compiles a C++ shared-memory all-reduce (`deepspeed_shm_comm`, ~55 s of g++ on a
    fresh machine's first ZeRO run) only to speed up the same collectives gloo performs: skip it, so the runs here
    use gloo, as the DDP and FSDP2 runs they are compared with do. GPU runs never build it."""
    import importlib

    # by module name: the attribute deepspeed.comm.torch is the torch package (deepspeed.comm star-imports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


if __name__ == "__main__":
    accelerate.Accelerator.__init__ = _deepspeed_init
    _no_shared_memory_op()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
