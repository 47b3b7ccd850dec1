"""The moving DPO reference under accelerate's FSDP2 plugin: the ZeRO-3 run of
``tests/deepspeed_scripts/dpo_reference_zero.py`` (same model, data, BEMA reference, recorder and
captured reference forwards) with FSDP2 in place of DeepSpeed, on 2 CPU ranks.

Launched by tests/test_fsdp.py as ``torchrun --nproc_per_node 2 dpo_reference_fsdp2.py --output_dir D
[--no-reshard]``; accelerate's CPU gate is lifted by :mod:`accelerate_cpu_fsdp`. DPOTrainer, given a
PeftModel, adds the ``"ref"`` adapter when it is built, so ``fully_shard`` (in ``trainer.train()``) shards
it with the policy adapter. Rank 0 writes ``D/trajectory.pt`` (the keys of ``dpo_reference_zero.run``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from accelerate_cpu_fsdp import allow_fsdp_on_cpu
from dpo_reference_zero import run  # tests/deepspeed_scripts is on PYTHONPATH (conftest.launch_two_ranks)
from fsdp_common import base_parser, exit_now, prepare_process


def main() -> None:
    options = base_parser().parse_args()
    prepare_process()
    allow_fsdp_on_cpu()
    fsdp_config = {
        "fsdp_version": 2,
        "reshard_after_forward": not options.no_reshard,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    }
    result = run("default", str(Path(options.output_dir) / "run"), zero=None, fsdp=True, fsdp_config=fsdp_config)
    if dist.get_rank() == 0:
        torch.save(result, Path(options.output_dir) / "trajectory.pt")
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main()
