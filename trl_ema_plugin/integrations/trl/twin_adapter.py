"""A frozen twin of the trained PEFT adapter on the same base model (the teacher, the DPO reference)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def requires_grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, flag in flags:
        if param.requires_grad != flag:
            param.requires_grad_(flag)


def add_twin_adapter(model: nn.Module, source: str, name: str) -> None:
    """Add adapter ``name``: ``source``'s config and weights, frozen; every other ``requires_grad`` kept.

    The config is copied with ``init_lora_weights=False``: PEFT runs a LoRA config's data-dependent
    initialisation (PiSSA, OLoRA, CorDA, LoftQ) on every ``add_adapter``, and those rewrite the frozen
    base weights into residuals. The twin's weights are copied from ``source`` instead.
    """
    config = copy.deepcopy(model.peft_config[source])
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = False
    flags = requires_grad_flags(model)
    model.add_adapter(name, config)
    restore_requires_grad(flags)  # add_adapter may touch the trained adapter's flags
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f".{source}." in param_name:
                twin = model.get_parameter(param_name.replace(f".{source}.", f".{name}."))
                if twin.shape == param.shape:  # under ZeRO-3 a partitioned source is empty until gathered
                    twin.copy_(param)
                twin.requires_grad_(False)


def freeze_adapter(model: nn.Module, name: str) -> None:
    """Turn off ``requires_grad`` of every parameter of adapter ``name``."""
    for param_name, param in model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)
