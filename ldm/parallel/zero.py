"""The DeepSpeed ZeRO-1/2 backend under accelerate: the engine's settings from ldm's config, its backward and step, and
whole tensors out of (and back into) its partitioned fp32 master weights and AdamW moments.

Under ZeRO-1/2 every process keeps the whole model (in bf16/fp16 with mixed precision), while the fp32 master weights
and the optimizer moments (ZeRO-1), and the gradients too (ZeRO-2), are split over the processes as flat partitions.
ldm writes the same checkpoint as under DDP or FSDP: whole fp32 tensors, optimizer state keyed by parameter name,
so a checkpoint moves between DeepSpeed, FSDP, DDP and one process. Gathering goes through DeepSpeed's public
`safe_get_full_*` / `safe_set_full_*` API, one all-reduce per tensor: every function here that gathers or scatters is
collective, all processes must call it, in the same order.

Not supported (stopped at start): ZeRO-3 (use FSDP, which shards the weights too), optimizer or parameter offload,
and an optimizer or LR scheduler in the DeepSpeed config (ldm builds both from its own `optim.*`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ldm.errors import UserError
from ldm.parallel.backend import Backend

log = logging.getLogger(__name__)


def is_zero(accelerator: Accelerator) -> bool:
    """True under accelerate's DeepSpeed integration."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_zero(accelerator: Accelerator, *, micro_batch: int, grad_accum: int, max_grad_norm: float) -> None:
    """Check the DeepSpeed config and set its batch, accumulation and clipping from ldm's config (call before
    `prepare`). ldm's `train.*`/`optim.*` values win over the accelerate config's, which are logged if different."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2):
        raise UserError(f"DeepSpeed ZeRO stage {stage} is not supported: set zero_stage: 2 (or 1) in the accelerate "
                        "config (configs/accelerate/deepspeed-zero2.yaml), or use FSDP (configs/accelerate/fsdp.yaml) "
                        "to shard the weights too")
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in (None, "none"):
            raise UserError(f"DeepSpeed {part} to {device} is not supported by ldm: set {part}_device: none in the "
                            "accelerate config")
    for part in ("optimizer", "scheduler"):
        if part in ds:
            raise UserError(f"the DeepSpeed config has an '{part}' section: remove it, ldm builds AdamW and its LR "
                            "schedule from the training config (optim.*)")
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * accelerator.num_processes,
        "gradient_clipping": float(max_grad_norm),  # 0: no clipping, as optim.max_grad_norm=0
    }
    replaced = [f"{key}={ds[key]}" for key, value in ours.items() if ds.get(key, "auto") not in ("auto", value)]
    ds.update(ours)
    accelerator.gradient_accumulation_steps = grad_accum  # what accelerate compares the config with at `prepare`
    log.info("DeepSpeed ZeRO-%d: micro-batch %d, gradient accumulation %d, clipping %s (from the training config%s)",
             stage, micro_batch, grad_accum, max_grad_norm or "off",
             f"; the accelerate config's {', '.join(replaced)} not used" if replaced else "")


class ZeroBackend(Backend):
    """DeepSpeed ZeRO-1/2: every process holds the whole module (bf16/fp16 copies under mixed precision); the fp32
    master weights and optimizer moments (and, ZeRO-2, the gradients) are partitioned. The engine accumulates,
    reduces, clips and steps."""

    sharded = True
    fp32_masters = True  # a checkpoint's fp32 weights load into the masters exactly, whatever the module's dtype

    def configure(self, *, micro_batch: int, grad_accum: int, max_grad_norm: float, mixed_precision: str) -> None:
        """Also writes batch, accumulation and clipping into the DeepSpeed config (so: before `prepare`)."""
        super().configure(micro_batch=micro_batch, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                          mixed_precision=mixed_precision)
        configure_zero(self.accelerator, micro_batch=micro_batch, grad_accum=grad_accum, max_grad_norm=max_grad_norm)

    def describe(self, what: str) -> str | None:
        return (f"DeepSpeed: {what}'s fp32 master weights and optimizer state are partitioned over "
                f"{self.accelerator.num_processes} processes")

    @contextlib.contextmanager
    def micro_step(self, model: Any, *, last: bool) -> Iterator[None]:
        model.set_gradient_accumulation_boundary(last)  # the engine reduces, clips and steps at the boundary only
        yield

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        model.backward(loss)  # the engine divides by the accumulation steps itself

    def step(self, model: Any, optimizer: Any, finite: bool) -> tuple[bool, torch.Tensor | None]:
        model.step()  # DeepSpeed skips the update itself (and drops the gradients) when one is not finite
        grad_norm = torch.tensor(model.get_global_grad_norm() or 0.0)
        if self.mixed_precision != "fp16":  # with fp16 its loss scaler skips overflowing steps by design
            finite &= model.was_step_applied()
        return finite, grad_norm

    def ema_source(self, model: Any) -> list[torch.Tensor]:
        # with bf16/fp16 the module holds low-precision weights: the EMA follows the fp32 master weights instead,
        # gathered whole from their partitions (one all-reduce of the model per step)
        return master_weights_list(model) if self.mixed_precision != "no" else super().ema_source(model)

    def model_state(self, model: Any) -> dict[str, torch.Tensor]:
        """The whole fp32 master weights (and buffers), on the main process ({} elsewhere)."""
        return master_weights(model)

    def load_model_state(self, model: Any, state: Mapping[str, torch.Tensor]) -> None:
        load_master_weights(model, state)

    def optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        return full_optimizer_state(model, optimizer)

    def load_optimizer_state(self, model: Any, optimizer: Any, state: dict) -> None:
        load_optimizer_state(model, optimizer, state)


def zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO optimizer inside accelerate's wrapper; its `.optimizer` is the torch optimizer ldm built."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not hasattr(inner, "bit16_groups"):
        raise UserError(f"unsupported DeepSpeed optimizer {type(inner).__name__}: ldm supports ZeRO stages 1 and 2")
    return inner


def master_weights(model: Any) -> dict[str, torch.Tensor]:
    """The whole fp32 master weights (and buffers) of a DeepSpeed engine's module, as a state dict on CPU on the
    main process ({} on the others). Collective."""
    module, is_main = model.module, torch.distributed.get_rank() == 0
    params = dict(module.named_parameters())
    out = {}
    for name, value in module.state_dict().items():
        whole = _full_fp32(params[name]) if name in params else value
        if is_main:
            out[name] = whole.detach().float().cpu() if name in params else whole.detach().cpu()
    return out


def master_weights_list(model: Any) -> list[torch.Tensor]:
    """The whole fp32 master weights of every parameter, in `module.parameters()` order, on every process: what the
    EMA follows when the module itself holds bf16/fp16 copies. Collective."""
    return [torch.nn.Parameter(_full_fp32(p), requires_grad=p.requires_grad) for p in model.module.parameters()]


def load_master_weights(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Load whole tensors (every process passes them) into the module and its fp32 master partitions."""
    from deepspeed.utils import safe_set_full_fp32_param

    module = model.module
    module.load_state_dict(dict(state), strict=True)  # the module's (possibly bf16) copy
    for name, param in module.named_parameters():
        safe_set_full_fp32_param(param, state[name].to(param.device, torch.float32))


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state as `torch.distributed.checkpoint` writes it under FSDP: whole tensors keyed by parameter
    name, on the main process ({"state": {}} elsewhere). Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, is_main = zero_optimizer(optimizer), torch.distributed.get_rank() == 0
    torch_opt = zero.optimizer
    names = _names(model)
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in params]}
              for group, params in zip(torch_opt.param_groups, zero.bit16_groups)]
    state: dict[str, dict[str, Any]] = {}
    for flat, params in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups):
        flat_state = torch_opt.state.get(flat, {})
        per_param = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape]
        shared = {k: v for k, v in flat_state.items() if k not in per_param}  # e.g. AdamW's step count
        for param in params:
            whole = {k: safe_get_full_optimizer_state(param, k) for k in per_param}
            if is_main and flat_state:
                state[names[id(param)]] = {**{k: _copy(v) for k, v in shared.items()},
                                           **{k: v.detach().cpu() for k, v in whole.items()}}
    return {"state": state, "param_groups": groups if is_main else []}


def load_optimizer_state(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """Load a whole optimizer state (keyed by parameter name, or by index as a DDP run saves it) into the ZeRO
    partitions of this process."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = zero_optimizer(optimizer)
    torch_opt = zero.optimizer
    names = _names(model)
    order = [names[id(p)] for params in zero.bit16_groups for p in params]  # the optimizer's parameter order
    by_index = {i: name for i, name in enumerate(order)}
    state = {by_index.get(k, k) if isinstance(k, int) else k: v for k, v in saved.get("state", {}).items()}
    saved_groups = saved.get("param_groups", [])
    if len(saved_groups) != len(torch_opt.param_groups):
        raise ValueError(f"{len(saved_groups)} saved parameter groups vs {len(torch_opt.param_groups)}")
    for group, params, kept in zip(torch_opt.param_groups, zero.bit16_groups, saved_groups):
        listed = [by_index.get(k, k) if isinstance(k, int) else k for k in kept["params"]]
        if listed != [names[id(p)] for p in params]:
            raise ValueError("the saved parameter groups hold other parameters")
        group.update({k: v for k, v in kept.items() if k != "params"})
    if not state:
        return
    missing = [name for name in order if name not in state]
    if missing:
        raise KeyError(f"no saved state for parameter {missing[0]}")
    for flat, params in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups):
        first = state[names[id(params[0])]]
        flat_state = torch_opt.state[flat]  # created here before the first step, as AdamW would create it
        for key, value in first.items():
            if torch.is_tensor(value) and value.dim() > 0:
                flat_state.setdefault(key, torch.zeros_like(flat))
            else:
                flat_state[key] = _copy(value)
    if not getattr(zero, "_hp_optimizer_states_linked", True):
        zero._lazy_init_hp_params_optimizer_state()  # point each parameter's fragment at the new state tensors
    for params in zero.bit16_groups:
        for param in params:
            for key, value in state[names[id(param)]].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)


def _full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    whole = safe_get_full_fp32_param(param)  # None for a frozen parameter: the module's copy is all there is
    return param.detach().float() if whole is None else whole


def _names(model: Any) -> dict[int, str]:
    return {id(p): name for name, p in model.module.named_parameters()}


def _copy(value: Any) -> Any:
    return value.detach().clone().cpu() if torch.is_tensor(value) else value
