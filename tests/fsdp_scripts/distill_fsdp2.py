"""Self-distillation under accelerate's FSDP2 plugin: the run of ``tests/deepspeed_scripts/distill_zero.py``
(SFTTrainer, LoRA, EMA teacher, λ = 1, τ = 2, the twin's global batch and order) with FSDP2 in place of
DeepSpeed, on 2 CPU ranks.

Launched by tests/test_fsdp.py as ``torchrun --nproc_per_node 2 distill_fsdp2.py --output_dir D
[--no-reshard]``; accelerate's CPU gate is lifted by :mod:`accelerate_cpu_fsdp`. ``attach`` adds the teacher
adapter before ``trainer.train()`` applies ``fully_shard``, so the teacher is sharded with the policy.
Rank 0 writes ``D/report.json`` (the keys of ``distill_zero.run``).
"""

from __future__ import annotations

import torch.distributed as dist
from accelerate_cpu_fsdp import allow_fsdp_on_cpu
from distill_zero import run  # tests/deepspeed_scripts is on PYTHONPATH (conftest.launch_two_ranks)
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
    run(options.output_dir, fsdp=True, fsdp_config=fsdp_config)
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main()
