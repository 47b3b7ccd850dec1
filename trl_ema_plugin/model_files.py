"""The model files of averaged weights, in the format the model trains in: a PEFT adapter, or a full model.

(The ``ema-export`` command, which copies or merges them afterwards, is :mod:`trl_ema_plugin.cli.export`.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .model_helpers import is_peft_model, is_sharded

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_averaged_weights(
    model: nn.Module, averaged: dict[str, Tensor], folder: Path, adapter_name: str | None = None
) -> None:
    """Save ``averaged`` (parameter name → full tensor) into ``folder``.

    PeftModel: ``adapter_model.safetensors`` + ``adapter_config.json``, cast to the adapter's
    dtype, as ``PeftModel.save_pretrained`` would write them (``adapter_name``: default the model's
    active adapter, the one being trained). Otherwise the model's state dict
    with the averaged tensors in place, through ``save_pretrained``.
    """
    if is_peft_model(model):
        from peft import get_peft_model_state_dict

        adapter_name = adapter_name or model.active_adapter

        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        state = {n: t.to(dtype=dtypes.get(n, t.dtype)) for n, t in averaged.items()}
        adapter_state = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
        adapter_state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()}
        save_file(adapter_state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        model.peft_config[adapter_name].save_pretrained(str(folder))
        return
    if any(is_sharded(p) for p in model.parameters()):
        _write_partitioned_full_model(model, averaged, folder)
        return
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    aliases = _tied_aliases(model)
    for name, tensor in averaged.items():
        tensor = tensor.to(dtype=state[name].dtype, device="cpu") if name in state else tensor.cpu()
        for alias in aliases.get(name, [name]):  # tied weights (lm_head = embeddings) share one average
            state[alias] = tensor
    with torch.no_grad():
        model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name (as ``named_parameters()`` gives it) → every name of that parameter object."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    return {name: names_by_param[id(param)] for name, param in model.named_parameters()}


def _write_partitioned_full_model(model: nn.Module, averaged: dict[str, Tensor], folder: Path) -> None:
    """ZeRO-3 / FSDP2 full fine-tuning: ``model.state_dict()`` holds partitions or shards, so write the gathered
    tensors (in the model's dtype, as the unsharded branch; tied weights are written once and re-tied on load)."""
    frozen = [n for n, _ in model.named_parameters() if n not in averaged]
    if frozen:
        raise ValueError(
            f"cannot export a full model under ZeRO-3 or FSDP2 when some parameters are frozen (e.g. {frozen[0]!r}): "
            "their partitions are not gathered; train a PEFT adapter, or unfreeze every parameter"
        )
    dtypes = {n: getattr(p, "ds_tensor", p).dtype for n, p in model.named_parameters()}
    tensors = {n: t.detach().to("cpu", dtype=dtypes.get(n, t.dtype)).contiguous() for n, t in averaged.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(folder))
