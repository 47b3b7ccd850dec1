"""Self-distillation under accelerate's FSDP2 plugin: the run of ``tests/deepspeed_scripts/distill_zero.py``
(SFTTrainer, LoRA, EMA teacher, λ = 1, τ = 2, the twin's global batch and order) with FSDP2 in place of
DeepSpeed, on 2 CPU ranks.

Launched by tests/test_fsdp.py as ``torchrun --nproc_per_node 2 distill_fsdp2.py --output_dir D
[--no-reshard]``; accelerate's CPU gate is lifted by :mod:`accelerate_cpu_fsdp`. ``attach`` adds the teacher
adapter before ``trainer.train()`` applies ``fully_shard``, so the teacher is sharded with the policy.
Rank 0 writes ``D/report.json`` (the keys of ``distill_zero.run``).
"""

from __future__ import annotations

from distill_zero import run  # tests/deepspeed_scripts is on PYTHONPATH (conftest.launch_two_ranks)
from fsdp_common import base_parser, finish, prepare_process, trainer_fsdp2_args


def main() -> None:
    options = base_parser().parse_args()
    prepare_process()
    run(options.output_dir, **trainer_fsdp2_args(not options.no_reshard))
    finish()


if __name__ == "__main__":
    main()
