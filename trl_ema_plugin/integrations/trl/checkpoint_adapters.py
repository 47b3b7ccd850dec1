"""Undo what transformers' resume does to PEFT adapters saved in checkpoint sub-folders.

On resume, transformers loads every sub-folder of a checkpoint that holds an
``adapter_model.safetensors`` as an extra adapter named after the folder. Our ``averaged/``
folders would become adapters named ``averaged``; and transformers 5.16 (Axolotl 0.19's pin),
when any such sub-folder exists, does not load the root adapter at all, so training would
silently continue from the initial adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ...model_files import ADAPTER_WEIGHTS
from ...model_helpers import is_peft_model


def drop_adapters(model: nn.Module, names: list[str]) -> list[str]:
    """Delete the PEFT adapters in ``names`` that the trainer loaded from our folders."""
    if not is_peft_model(model):
        return []
    dropped = [name for name in names if name in model.peft_config and name != model.active_adapter]
    for name in dropped:
        model.delete_adapter(name)
    return dropped


@torch.no_grad()
def restore_policy_adapter(model: nn.Module, checkpoint: str | os.PathLike[str], adapter_name: str = "default") -> bool:
    """Load ``checkpoint/adapter_model.safetensors`` into ``adapter_name`` if the trainer did not.

    Returns whether anything was restored (transformers 5.24 restores it itself; 5.16 does not); the
    caller tells the user (:meth:`~trl_ema_plugin.integrations.trl.lifecycle.PluginCallback.resume`).
    """
    path = Path(checkpoint) / ADAPTER_WEIGHTS
    if not is_peft_model(model) or not path.is_file():
        return False
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(path))
    current = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if saved.keys() == current.keys() and all(torch.equal(current[k], saved[k].to(current[k])) for k in saved):
        return False
    set_peft_model_state_dict(model, saved, adapter_name=adapter_name)
    return True
