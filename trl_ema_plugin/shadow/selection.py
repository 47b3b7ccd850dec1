"""Which parameters are averaged: the trainable ones (the PEFT adapter, or all for full fine-tuning)."""

from __future__ import annotations

from torch import nn


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in model order.

    For a PeftModel that is the active adapter (LoRA A/B, DoRA magnitudes, ``modules_to_save``);
    the frozen base model and inactive adapters (``"ref"``, a teacher) are never selected.
    """
    selected = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not selected:
        raise ValueError(
            "weight averaging found no trainable parameters (requires_grad=True) in the model; "
            "pass a PEFT model with an active adapter, or unfreeze the weights to fine-tune"
        )
    return selected


def adapter_twin_names(names: list[str], source: str, target: str) -> list[str]:
    """Names of the same tensors in another PEFT adapter: ``lora_A.default.weight`` → ``lora_A.ref.weight``."""
    marker, replacement = f".{source}.", f".{target}."
    twins = []
    for name in names:
        if marker not in name:
            raise ValueError(f"parameter {name!r} does not belong to adapter {source!r}; cannot map it to {target!r}")
        twins.append(name.replace(marker, replacement))
    return twins


def parameters_by_name(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Look up parameters by name, with a clear error for a missing one."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter(s) {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return [(n, params[n]) for n in names]
