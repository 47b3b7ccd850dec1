"""What a trainer hands a callback: strip the engine wrappers, recognise a PEFT model and a sharded parameter."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters train: strips DDP / DeepSpeed engine wrappers (their ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (``PeftModel`` or a subclass): it has adapters and an active one."""
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter")


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard, or tensor parallel)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(param: Tensor) -> bool:
    """Whether ``param`` is held in parts over the ranks: a ZeRO-3 partition (``ds_tensor``) or an FSDP2 shard."""
    return hasattr(param, "ds_tensor") or is_dtensor(param)
