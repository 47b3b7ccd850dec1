"""Pick the shadow layout for the current process setup (single process, replicated, ZeRO-3)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..shadow import LocalLayout, ShadowLayout


def zero_stage(args: Any) -> int | None:
    """DeepSpeed ZeRO stage of a ``TrainingArguments``, or None without DeepSpeed."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None:
        return None
    stage = ds_config.get_value("zero_optimization.stage")
    return int(stage) if stage is not None else 0


def build_layout(named_params: list[tuple[str, nn.Parameter]], args: Any) -> ShadowLayout:
    """LocalLayout in one process; the sharded layouts under torch.distributed / DeepSpeed."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    stage = zero_stage(args)
    if stage == 3 or any(hasattr(p, "ds_tensor") for _, p in named_params):
        from .deepspeed import Zero3Layout

        return Zero3Layout(named_params)
    if distributed:
        from .deepspeed import SlicedLayout

        return SlicedLayout(named_params)
    return LocalLayout(named_params)
