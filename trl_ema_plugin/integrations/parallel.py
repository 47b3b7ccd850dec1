"""Pick the shadow layout for the current process setup (single process, replicated, ZeRO-3, FSDP2).

The choice comes from the trainer's own configuration, with no user flag:

* parameters partitioned by DeepSpeed (``p.ds_tensor``; ZeRO stage 3) → ``Zero3Layout``;
* parameters sharded by PyTorch FSDP2 (``fully_shard``: DTensors) → ``Fsdp2Layout``;
* FSDP1 (``FullyShardedDataParallel``) → an error that points to FSDP2;
* several processes with replicated parameters (ZeRO-0/1/2, DDP) → ``SlicedLayout``;
* one process → :class:`~trl_ema_plugin.shadow.LocalLayout`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..distributed import world_size
from ..model_helpers import is_peft_model
from ..shadow import LocalLayout, ShadowLayout


def _stage_of(ds_config: Any) -> int | None:
    """Stage from a ``HfDeepSpeedConfig`` (``get_value``) or a plain dict config."""
    if ds_config is None:
        return None
    if hasattr(ds_config, "get_value"):
        stage = ds_config.get_value("zero_optimization.stage")
    elif isinstance(ds_config, dict):
        stage = ds_config.get("zero_optimization", {}).get("stage")
    else:
        return None
    return int(stage) if stage is not None else 0


def zero_stage(args: Any) -> int | None:
    """DeepSpeed ZeRO stage of a run, or None without DeepSpeed.

    Read from ``args.hf_deepspeed_config`` (set by ``TrainingArguments(deepspeed=...)`` and by the
    trainer under ``accelerate launch --use_deepspeed``), else from accelerate's DeepSpeed plugin.
    """
    stage = _stage_of(getattr(args, "hf_deepspeed_config", None))
    if stage is not None:
        return stage
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:  # set up by an Accelerator; never create one from here
            plugin = AcceleratorState().deepspeed_plugin
    if plugin is not None and getattr(plugin, "zero_stage", None) is not None:
        return int(plugin.zero_stage)
    return None


def sharded_by(args: Any, model: nn.Module | None) -> str | None:
    """The engine that shards the parameters of ``model``: ``"ZeRO-3"``, ``"FSDP2"``, or None (replicated, one process).

    A parameter added after sharding (an extra adapter) is not sharded with the others.
    """
    from .fsdp import uses_fsdp2

    if zero_stage(args) == 3:
        return "ZeRO-3"
    return "FSDP2" if uses_fsdp2([], model) else None


def engine_restores_model(args: Any, model: nn.Module | None) -> bool:
    """Whether the trainer resumes ``model`` from its engine's own files (DeepSpeed, FSDP2), which never load our
    checkpoint sub-folders as adapters (transformers does so for plain PEFT checkpoints)."""
    return zero_stage(args) is not None or sharded_by(args, model) == "FSDP2"


def build_layout(
    named_params: list[tuple[str, nn.Parameter]], args: Any, model: nn.Module | None = None
) -> ShadowLayout:
    """LocalLayout in one process; the sharded layouts under torch.distributed / DeepSpeed / FSDP2.

    ``model``: the module ``named_params`` were read from. FSDP2 reshards its modules after each write,
    so that the next forward sees the written shards; FSDP1 is recognised by its wrappers, so pass the
    model before unwrapping where the trainer wraps it in FSDP1.
    """
    from .fsdp import Fsdp2Layout, check_not_fsdp1, uses_fsdp2

    distributed = world_size() > 1
    stage = zero_stage(args)
    if stage == 3 or any(hasattr(p, "ds_tensor") for _, p in named_params):
        from .deepspeed import Zero3Layout

        return Zero3Layout(named_params)
    if uses_fsdp2(named_params, model):
        return Fsdp2Layout(named_params, model)
    check_not_fsdp1(named_params, model, args)
    if distributed:
        from .deepspeed import SlicedLayout

        return SlicedLayout(named_params)
    return LocalLayout(named_params)


def pack_adapter_weights(layout: ShadowLayout, model: nn.Module, args: Any) -> bool:
    """Lay a PEFT adapter's trainable parameters out in one flat buffer (:meth:`LocalLayout.make_contiguous`), so
    that every update reads θ as one tensor. Returns whether they are laid out so.

    Only in one process without DeepSpeed (whose ZeRO optimizer points ``p.data`` into its own flat buffers) and
    only for PEFT adapters, many small tensors: ``PeftModel.save_pretrained`` clones tensors that share a storage,
    while transformers' ``save_pretrained`` of a full model checks shared storages against its tied-weight keys.
    """
    if not isinstance(layout, LocalLayout) or zero_stage(args) is not None or not is_peft_model(model):
        return False
    return layout.make_contiguous()
