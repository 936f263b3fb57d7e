"""Run a training script under accelerate's FSDP2 with CPU processes (gloo): for tests on machines without GPUs.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_on_cpu.py train/train_ldm.py ARGS... train.cpu=true

accelerate only turns FSDP on for GPUs (a CPU launch becomes plain DDP), while torch's FSDP2 itself runs on CPU with
gloo. This shim switches the Accelerator to FSDP2 right after its normal CPU setup, with the plugin settings of
configs/accelerate/fsdp.yaml, so the script's own FSDP paths (sharded prepare, EMA over shards, gathered checkpoints,
lock-step validation sampling, gathered export) really run here. Only the launch plumbing differs from a GPU run.
"""

from __future__ import annotations

import runpy
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

WRAPPED_CLASSES = ["BasicTransformerBlock", "ResnetBlock2D"]  # as fsdp_transformer_layer_cls_to_wrap in fsdp.yaml
_original_init = accelerate.Accelerator.__init__


def _fsdp_init(self, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    # both shared states: a later AcceleratorState() re-reads PartialState's
    PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=WRAPPED_CLASSES,
        reshard_after_forward=True,
    )
    if self.state.mixed_precision != "no":  # what accelerate's own FSDP setup does
        plugin.set_mixed_precision(self.state.mixed_precision)
    self.state.fsdp_plugin = plugin


if __name__ == "__main__":
    accelerate.Accelerator.__init__ = _fsdp_init
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
