"""Which PyTorch FSDP a run uses: FSDP2 (``fully_shard``, DTensor parameters), FSDP1 or none.

The layout follows what the engine really did to the parameters, not only what was asked: on CPU,
accelerate (1.13 to 1.15) keeps an FSDP request only for accelerator devices and silently trains
with DDP, so a run may ask for FSDP and hold ordinary replicated parameters.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...model_helpers import is_dtensor
from .layout import fsdp2_modules

#: parameter-name parts that FSDP1 (``FullyShardedDataParallel``) adds to the modules it wraps
FSDP1_NAME_MARKERS = ("_fsdp_wrapped_module", "_flat_param")

FSDP1_UNSUPPORTED = (
    "weight averaging does not support FSDP1 (FullyShardedDataParallel, fsdp_version 1): its parameters are views "
    "into flat shards that do not follow the tensors' shapes. Use FSDP2: fsdp_config={{'fsdp_version': 2, ...}} in "
    "TrainingArguments, `accelerate launch --use_fsdp --fsdp_version 2`, or `fsdp_version: 2` in Axolotl ({found})"
)


def requested_fsdp_version(args: Any) -> int | None:
    """The FSDP version a run asks for (1 or 2), or None without FSDP.

    From ``args.fsdp`` with ``args.fsdp_config["version"]`` (transformers 5 stores ``fsdp_version``
    under that key, default 2), else from accelerate's FSDP plugin when an ``Accelerator``
    set one up (``accelerate launch --use_fsdp``).
    """
    fsdp = getattr(args, "fsdp", None)
    if fsdp and fsdp not in ("", [], "no"):
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:  # never create accelerate's state from here
        return None
    plugin = getattr(AcceleratorState(), "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1))


def uses_fsdp2(named_params: list[tuple[str, nn.Parameter]], model: nn.Module | None = None) -> bool:
    """Whether ``fully_shard`` sharded these parameters (DTensors) or wrapped ``model``."""
    return any(is_dtensor(p) for _, p in named_params) or bool(fsdp2_modules(model))


def fsdp1_evidence(named_params: list[tuple[str, nn.Parameter]], model: nn.Module | None, args: Any) -> str | None:
    """Why this run is FSDP1 (a sentence for the error), or None.

    Looks at the parameter names (nested FSDP1 wrappers add ``_fsdp_wrapped_module``), at
    ``model`` (pass the model *before* unwrapping: a root ``FullyShardedDataParallel`` wrapper
    leaves no trace in its inner module's names) and at the requested version.
    """
    marked = [n for n, _ in named_params if any(marker in n for marker in FSDP1_NAME_MARKERS)]
    if marked:
        return f"parameter {marked[0]!r} lies inside a FullyShardedDataParallel wrapper"
    if model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapper = next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)
        if wrapper is not None:
            return f"the model contains a FullyShardedDataParallel wrapper around {type(wrapper.module).__name__}"
    if requested_fsdp_version(args) == 1:
        return "the training arguments ask for FSDP with fsdp_version 1"
    return None


def check_not_fsdp1(named_params: list[tuple[str, nn.Parameter]], model: nn.Module | None, args: Any) -> None:
    """Raise the error that points to FSDP2 when the run is FSDP1."""
    found = fsdp1_evidence(named_params, model, args)
    if found is not None:
        raise ValueError(FSDP1_UNSUPPORTED.format(found=found))
