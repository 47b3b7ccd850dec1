"""Let accelerate's FSDP plugin run on CPU processes (gloo), for the 2-rank trainer tests only.

accelerate (1.13 and 1.15) keeps an FSDP plugin only when its distributed type is an accelerator
one (``AcceleratorState.__init__``: MULTI_GPU, MULTI_XPU, ...): with CPU processes (MULTI_CPU) it
drops the plugin without a word, and the HF Trainer then wraps the model in DDP. Everything after
that decision (``fsdp2_prepare_model``, ``fully_shard`` on the model, FSDP2 checkpoints through
``save_fsdp_model`` / ``load_fsdp_model``) runs on CPU with gloo as it is.

:func:`allow_fsdp_on_cpu` changes only that decision: when an ``Accelerator`` is created with an
FSDP plugin on CPU processes, the state records ``DistributedType.FSDP`` and keeps the plugin, in
``AcceleratorState`` and in ``PartialState`` (which ``Accelerator.distributed_type`` and
``is_fsdp2`` read). The trainer, accelerate's FSDP2 code and torch's ``fully_shard`` are unchanged.
"""

from __future__ import annotations


def allow_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    def init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            state.PartialState().distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init_keeping_fsdp._fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init_keeping_fsdp
