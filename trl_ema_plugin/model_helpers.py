"""What a trainer hands a callback: strip the engine wrappers, recognise a PEFT model."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters train: strips DDP / DeepSpeed engine wrappers (their ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (``PeftModel`` or a subclass): it has adapters and an active one."""
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter")
