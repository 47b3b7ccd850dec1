"""The self-distillation teacher: a second PEFT adapter on the same base model, holding averaged weights.

No second copy of the base model: the teacher is one extra adapter (named ``ema_teacher`` by
default, a copy of the trained adapter's config, frozen). After each update of the averager its
weights are rewritten with ``AveragedWeights.average_local(t)`` through a layout over the twin
parameters, so under ZeRO-3 and FSDP2 each rank writes its own shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...model_helpers import is_dtensor, is_peft_model
from ...shadow import AveragedWeights, ShadowLayout, adapter_twin_names, parameters_by_name
from ..parallel import build_layout
from .twin_adapter import add_twin_adapter, freeze_adapter, requires_grad_flags, restore_requires_grad


class TeacherAdapter:
    """A frozen twin of the trained PEFT adapter that the teacher forward runs with."""

    def __init__(self, model: nn.Module, name: str = "ema_teacher") -> None:
        if not is_peft_model(model):
            raise ValueError(
                "self-distillation needs a PEFT model (LoRA, DoRA, rsLoRA): the teacher is a second adapter on the "
                f"same base model, never a second copy of it; got {type(model).__name__}. Pass peft_config= to the trainer"
            )
        source = model.active_adapter
        if not isinstance(source, str):
            raise ValueError(f"self-distillation needs one active adapter, got {source!r}")
        if model.peft_config[source].is_prompt_learning:
            raise ValueError("self-distillation supports LoRA-style adapters (LoRA, DoRA, rsLoRA), not prompt learning")
        self.model = model
        self.name = name
        self.source = source
        if name not in model.peft_config:
            add_twin_adapter(model, source, name)
        else:
            freeze_adapter(model, name)
        self.layout: ShadowLayout | None = None
        self._bound: AveragedWeights | None = None
        self._signature: tuple[Any, ...] | None = None

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the teacher adapter."""
        return [(n, p) for n, p in self.model.named_parameters() if f".{self.name}." in n]

    def memory_bytes(self) -> int:
        """Bytes of the teacher adapter's weights on this rank (under ZeRO-3 or FSDP2, its shard).

        Once bound, read through the layout: after a forward, FSDP2 modules may hold the unsharded (with a
        mixed-precision policy, bf16) copies, not the shards this rank keeps.
        """
        if self.layout is not None:
            return sum(t.numel() * t.element_size() for t in self.layout.local_tensors())
        total = 0
        for _, p in self.parameters():
            shard = getattr(p, "ds_tensor", None)
            tensor = shard if shard is not None else (p.to_local() if is_dtensor(p) else p)
            total += tensor.numel() * tensor.element_size()
        return total

    # ------------------------------------------------------------------ weights
    def bind(self, averaged: AveragedWeights, args: Any) -> None:
        """Lay the teacher's parameters out like the averager's (same names, other adapter)."""
        twins = adapter_twin_names(averaged.layout.names, self.source, self.name)
        self.layout = build_layout(parameters_by_name(self.model, twins), args, model=self.model)
        self._bound = averaged
        self._signature = None

    @torch.no_grad()
    def refresh(self, averaged: AveragedWeights, t: int, args: Any) -> bool:
        """Write the averaged weights of step ``t`` into the teacher when the averager moved since the last write."""
        if self._bound is not averaged:
            self.bind(averaged, args)
        signature = averaged.version  # as submitted: the update itself may still be running
        if signature == self._signature:
            return False
        assert self.layout is not None
        self.layout.write_local(averaged.average_local(t))  # waits for it
        self._signature = signature
        return True

    # ------------------------------------------------------------------ forward
    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the model as the teacher: teacher adapter, eval mode (dropout off), no gradient.

        ``set_adapter`` changes ``requires_grad`` flags; they, the active adapter and every module's
        train/eval mode are restored exactly afterwards.
        """
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        flags = requires_grad_flags(model)
        previous = model.active_adapter
        try:
            with torch.no_grad():
                model.eval()
                model.set_adapter(self.name, inference_mode=True)
                yield
        finally:
            model.set_adapter(previous)
            restore_requires_grad(flags)
            for module, mode in modes:
                module.training = mode
