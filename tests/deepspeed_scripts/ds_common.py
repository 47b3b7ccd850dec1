"""Shared by the tests, the 2-rank CPU test scripts and the benchmarks (this folder is on their sys.path):
the CPU trainer arguments, DeepSpeed configs and a reliable reference gather."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from transformers import TrainingArguments
from trl import SFTConfig

from trl_ema_plugin.model_helpers import is_dtensor

Args = TypeVar("Args", bound=TrainingArguments)

#: a few fast steps of the tiny model that move its weights visibly (the tests' default run)
TINY_RUN: dict[str, Any] = {
    "learning_rate": 2e-2, "lr_scheduler_type": "constant", "logging_steps": 1, "max_length": 48, "seed": 0,
}  # fmt: skip
#: the global batch of a 2-rank run and of its 1-process twin
GLOBAL_BATCH = 4


def cpu_training_args(
    output_dir: str,
    config_class: type[Args] = SFTConfig,
    zero: int | None = None,
    persistence: str = "default",
    **overrides: Any,
) -> Args:
    """``config_class`` (SFTConfig, DPOConfig...) for a CPU run in fp32: no bf16/fp16, no reporting, no progress
    bars, no checkpoints unless ``overrides`` ask; under DeepSpeed ZeRO-``zero`` when given (:func:`zero_config`)."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "report_to": [],
        "disable_tqdm": True,
        "save_strategy": "no",
        "deepspeed": zero_config(zero, persistence) if zero is not None else None,
    }
    return config_class(**{**values, **overrides})


def twin_args(output_dir: str, zero: int | None = None, persistence: str = "default", **overrides: Any) -> SFTConfig:
    """:data:`TINY_RUN` on :data:`GLOBAL_BATCH` examples per step, in the same order on 2 ranks and in 1 process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torch.distributed starts inside the config
    values = {
        **TINY_RUN,
        "per_device_train_batch_size": GLOBAL_BATCH // world_size,
        "train_sampling_strategy": "sequential",
    }
    return cpu_training_args(output_dir, SFTConfig, zero, persistence, **{**values, **overrides})


def zero_config(stage: int, persistence: str = "default") -> dict[str, Any]:
    """ZeRO-`stage` for CPU runs: small buckets (the defaults allocate gigabytes).

    ``persistence``: ``"default"`` leaves ``stage3_param_persistence_threshold`` out, so DeepSpeed's own
    100,000 applies and every LoRA tensor stays gathered between forwards; a number sets it (0: none does).
    """
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": 1_000_000}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size=1_000_000)
        if persistence != "default":
            zero["stage3_param_persistence_threshold"] = int(persistence)
    else:
        zero.update(allgather_bucket_size=1_000_000, overlap_comm=False, contiguous_gradients=True)
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 1_000_000,
    }


def _gather_once(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone().float().cpu() for n, p in named}


def stable_gather(
    named: list[tuple[str, torch.nn.Parameter]], on_retry: Callable[[], None] | None = None
) -> dict[str, torch.Tensor]:
    """Full tensors through DeepSpeed's own gather under ZeRO-3, or DTensor's ``full_tensor()`` under FSDP2
    (collective), independent of our layouts.

    With DeepSpeed 0.18.9 on CPU, ``GatheredParameters`` now and then returns a few uninitialised
    elements (in about half of the runs, already at train begin, before any callback of ours acts;
    never seen with 0.19.8). Training is unaffected. So gather until two consecutive gathers agree.
    """
    if not any(hasattr(p, "ds_tensor") for _, p in named):
        return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone().float().cpu() for n, p in named}
    previous = _gather_once(named)
    for _ in range(8):
        current = _gather_once(named)
        agree = torch.tensor([int(all(torch.equal(previous[n], current[n]) for n in current))])
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # every rank takes the same branch (collectives follow)
        if agree.item():
            return current
        if on_retry is not None:
            on_retry()
        previous = current
    raise RuntimeError("DeepSpeed's GatheredParameters returned different values eight times in a row")


def gathered(params: list[tuple[str, torch.nn.Parameter]]) -> list[torch.Tensor]:
    """Full tensors of ``params`` in order, through DeepSpeed's own gather or DTensor's (collective), see
    :func:`stable_gather`."""
    full = stable_gather(params)
    return [full[n] for n, _ in params]
