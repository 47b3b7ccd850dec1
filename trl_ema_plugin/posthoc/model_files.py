"""How synthesized tensors become model files: the run's description of its model, written once at train begin.

The snapshots hold tensors by parameter name (``...q_proj.lora_A.default.weight``). To write a PEFT adapter from
them without loading the model, the recorder writes beside the snapshots, at train begin:

* ``adapter_config.json`` (PEFT) or ``config.json`` (full fine-tuning), the model's own;
* ``model.json``: ``format`` (``peft`` | ``full``), ``adapter_name``, and per parameter its key in the saved file
  (``keys``, as ``PeftModel.save_pretrained`` spells it: the adapter name dropped) and its dtype (``dtypes``).

:func:`write_model_files` then writes ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable with
``PeftModel.from_pretrained``) or ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..model_files import ADAPTER_WEIGHTS
from ..model_helpers import is_peft_model

MODEL_JSON = "model.json"
ADAPTER_CONFIG = "adapter_config.json"
FULL_CONFIG = "config.json"
FULL_WEIGHTS = "model.safetensors"


def describe_model(model: nn.Module, names: list[str], folder: str | os.PathLike[str]) -> None:
    """Write ``model.json`` and the model's config into ``folder`` for the tracked parameters ``names``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    dtypes = {n: str(getattr(params[n], "ds_tensor", params[n]).dtype).removeprefix("torch.") for n in names}
    if is_peft_model(model):
        from peft import get_peft_model_state_dict

        adapter = model.active_adapter
        placeholders = {
            n: torch.zeros(1) for n in names
        }  # distinct objects: the saved key of each is found by identity
        saved = get_peft_model_state_dict(model, state_dict=dict(placeholders), adapter_name=adapter)
        key_of = {id(v): k for k, v in saved.items()}
        keys = {n: key_of.get(id(p), n) for n, p in placeholders.items()}
        model.peft_config[adapter].save_pretrained(str(folder))
        description: dict[str, Any] = {"format": "peft", "adapter_name": adapter, "keys": keys, "dtypes": dtypes}
    else:
        model.config.save_pretrained(str(folder))
        description = {"format": "full", "adapter_name": None, "keys": {n: n for n in names}, "dtypes": dtypes}
    (folder / MODEL_JSON).write_text(json.dumps(description, indent=1, sort_keys=True))


def read_description(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the snapshots have no model description (the recorder writes it at train begin), "
            "so they cannot be written as an adapter"
        )
    return json.loads(path.read_text())


def write_model_files(
    tensors: Mapping[str, Tensor], folder: str | os.PathLike[str], output: str | os.PathLike[str]
) -> Path:
    """Write synthesized ``tensors`` (parameter name → tensor) as the run's model files into ``output``: a PEFT
    adapter, or for full fine-tuning the tracked tensors as ``model.safetensors`` beside ``config.json``."""
    folder, output = Path(folder), Path(output)
    description = read_description(folder)
    keys, dtypes = description["keys"], description["dtypes"]
    unknown = sorted(set(tensors) - set(keys))
    if unknown:
        raise ValueError(
            f"{folder / MODEL_JSON} lists no parameter(s) {unknown[:3]}: the snapshots belong to another run"
        )
    output.mkdir(parents=True, exist_ok=True)
    weights = {keys[n]: t.detach().to("cpu", getattr(torch, dtypes[n])).contiguous() for n, t in tensors.items()}
    peft = description["format"] == "peft"
    save_file(weights, str(output / (ADAPTER_WEIGHTS if peft else FULL_WEIGHTS)), metadata={"format": "pt"})
    config = ADAPTER_CONFIG if peft else FULL_CONFIG
    shutil.copy2(folder / config, output / config)
    return output


def load_into(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (parameter name → tensor, as recorded) into ``model``'s parameters of the same names."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(
            f"the model has no parameter(s) {missing[:3]}; load the synthesized tensors into the run's model"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
