"""What the plugin refuses under torch.distributed sharding, on 2 CPU ranks (gloo).

Launched by tests/test_fsdp.py as ``torchrun --nproc_per_node 2 fsdp_refusals.py --output_dir D``.
Rank 0 writes ``D/refusals.json``: for each case the error ``build_layout`` raised (or ``null``):

* ``fsdp1_nested``: FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) wrapping each decoder
  layer and the root, parameters read from the unwrapped inner model (names carry the wrappers);
* ``fsdp1_root_only``: FSDP1 on the root only, the wrapper passed as ``model``;
* ``shard_dim1``: a DTensor parameter sharded on dim 1 (not FSDP2's dim-0 rule);
* ``reference_added_after_sharding``: ``AveragedReferenceCallback`` set up on a LoRA model that ``fully_shard``
  sharded without a ``"ref"`` adapter (one added now would not be sharded);
* also ``fsdp1_shapes``: the shapes FSDP1 gives the LoRA parameters (flat 1-D views, uneven per rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_common import finish
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import Shard, distribute_tensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from trl_ema_plugin.demos.tiny import tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.parallel import build_layout
from trl_ema_plugin.integrations.trl.dpo_reference import AveragedReferenceCallback
from trl_ema_plugin.shadow import trainable_parameters


def lora_model() -> torch.nn.Module:
    model = tiny_llama(tiny_tokenizer(), seed=0)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=3, target_modules="all-linear", lora_dropout=0.0))


def refusal(named, model) -> str | None:
    try:
        build_layout(named, args=None, model=model)
    except ValueError as error:
        return str(error)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    found = {}

    wrapper = FullyShardedDataParallel(
        lora_model(), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        device_id=torch.device("cpu"),
    )  # fmt: skip
    inner = trainable_parameters(wrapper.module)
    found["fsdp1_nested"] = refusal(inner, wrapper.module)
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, [(n, list(p.shape)) for n, p in inner[:2]])
    found["fsdp1_shapes"] = shapes

    root_only = FullyShardedDataParallel(lora_model(), use_orig_params=True, device_id=torch.device("cpu"))
    found["fsdp1_root_only"] = refusal(trainable_parameters(root_only.module), root_only)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    linear = torch.nn.Linear(4, 6)
    linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(1)]))
    found["shard_dim1"] = refusal([("weight", linear.weight)], None)

    sharded = lora_model()
    fully_shard(sharded)
    try:
        AveragedReferenceCallback("bema", update_every=1).setup(sharded, None)
        found["reference_added_after_sharding"] = None
    except ValueError as error:
        found["reference_added_after_sharding"] = str(error)
    found["reference_adapters"] = sorted(sharded.peft_config)

    if dist.get_rank() == 0:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "refusals.json").write_text(json.dumps(found, indent=1))
    finish()


if __name__ == "__main__":
    main()
