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
from dpo_reference_zero import run  # tests/deepspeed_scripts is on PYTHONPATH (conftest.launch_two_ranks)
from fsdp_common import base_parser, finish, prepare_process, trainer_fsdp2_args


def main() -> None:
    options = base_parser().parse_args()
    prepare_process()
    fsdp = trainer_fsdp2_args(not options.no_reshard)
    result = run("default", str(Path(options.output_dir) / "run"), zero=None, **fsdp)
    if dist.get_rank() == 0:
        torch.save(result, Path(options.output_dir) / "trajectory.pt")
    finish()


if __name__ == "__main__":
    main()
