"""Post-hoc EMA under accelerate's FSDP2 plugin: the run of ``tests/deepspeed_scripts/posthoc_zero.py`` (SFTTrainer,
LoRA, σ_rel 0.05 and 0.10, the twin's global batch and order, checkpoints at step 3) with FSDP2 in place of
DeepSpeed, on 2 CPU ranks, or resumed from such a checkpoint on 1 rank.

Launched by tests/test_posthoc_deepspeed.py as ``torchrun --nproc_per_node 2 posthoc_fsdp2.py --output_dir D``
(``--nproc_per_node 1 ... --resume_from D/checkpoint-3`` to resume); accelerate's CPU gate is lifted by
:mod:`accelerate_cpu_fsdp`. The trainer checkpoints with ``SHARDED_STATE_DICT`` (DCP reshards it for 1 rank).
Rank 0 writes ``D/report.json`` and ``D/trajectory.pt`` (those of ``posthoc_zero.run``).
"""

from __future__ import annotations

from fsdp_common import base_parser, finish, prepare_process, trainer_fsdp2_args
from posthoc_zero import run  # tests/deepspeed_scripts is on PYTHONPATH (conftest.launch_two_ranks)


def main() -> None:
    parser = base_parser()
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--max_steps", type=int, default=6)
    options = parser.parse_args()
    prepare_process()
    engine = trainer_fsdp2_args(not options.no_reshard, state_dict_type="SHARDED_STATE_DICT")
    run(options.output_dir, resume_from=options.resume_from, max_steps=options.max_steps, **engine)
    finish()


if __name__ == "__main__":
    main()
