"""One GRPOTrainer + LoRA run under DeepSpeed ZeRO-3: moving reference, averaged policy and self-distillation.

Launched by tests/test_rl_reference.py as
``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P grpo_zero.py --persistence 0|default --output_dir D``.
The run has a BEMA reference (``"ref"``, written at each generation batch, one every 2 optimizer steps), a BEMA
averaged policy, and self-distillation from it (``ema_teacher``). Rank 0 writes ``D/trajectory-<threshold>.pt``:
the policy θ_t, the ``"ref"`` and teacher adapters after every optimizer step (gathered with DeepSpeed's own
``GatheredParameters``, independent of the layouts under test), the generation batches and the reference each
read, the reference forwards rank 0 ran (inputs, log-probs), the logged ``loss/distill``, the averaged policy at
the end, the layout classes, and whether the base weights stayed bit-identical.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ds_common import GLOBAL_BATCH, gathered
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_ema_plugin import AveragedReferenceCallback, SelfDistillationCallback, WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import letters_reward, tiny_prompt_dataset, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the reference probe
from rl_helpers import ReferenceProbe, generation_args, lora_policy

#: BEMA with non-default settings: starts at step 1, moves at every step; written at each generation batch
REFERENCE: dict[str, Any] = {
    "method": "bema", "ref_update_every": 1, "update_every": 1, "update_after": 1, "lag": 2.0,
    "ema_power": 0.6, "bias_power": 0.3, "multiplier": 1.5,
}  # fmt: skip
#: the averaged policy and teacher: another non-default BEMA
AVERAGING: dict[str, Any] = {"update_every": 1, "update_after": 1, "lag": 3.0, "ema_power": 0.5, "bias_power": 0.25}
MAX_STEPS = 5
WARMUP = 1


class Recorder(TrainerCallback):
    """θ_t, ref_t and the teacher after every step (collective gathers); placed after our callbacks."""

    def __init__(self) -> None:
        self.theta: dict[int, list[torch.Tensor]] = {}
        self.ref: dict[int, list[torch.Tensor]] = {}
        self.teacher: dict[int, list[torch.Tensor]] = {}

    def _adapter(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if f".{name}." in n]

    def _record(self, step: int) -> None:
        self.theta[step] = gathered(self._adapter("default"))
        self.ref[step] = gathered(self._adapter("ref"))
        self.teacher[step] = gathered(self._adapter("ema_teacher"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
        self.base_before = gathered(self.base)
        self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.base_after = gathered(self.base)


def run(persistence: str, output_dir: str) -> dict[str, Any]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model, _ = lora_policy("llama", seed=0)
    args = generation_args(
        GRPOConfig, output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        steps_per_generation=2, zero=3, persistence=persistence,
    )  # fmt: skip
    reference = AveragedReferenceCallback(**REFERENCE)
    averaging = WeightAveragingCallback(method="bema", eval=False, export_at_end=False, **AVERAGING)
    distillation = SelfDistillationCallback(lambda_=1.0, warmup_steps=WARMUP)
    recorder = Recorder()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=letters_reward,
        args=args,
        train_dataset=tiny_prompt_dataset(32, seed=0),
        processing_class=tiny_tokenizer(),
        callbacks=[reference, averaging, distillation, recorder],
    )
    probe = ReferenceProbe(trainer, record_adapter=False)
    attach(trainer)
    trainer.train()
    averaged = averaging.averaged_tensors()  # collective
    names = [n for n, _ in recorder._adapter("default")]
    return {
        "theta": recorder.theta,
        "ref": recorder.ref,
        "teacher": recorder.teacher,
        "generations": reference.generations,
        "captured": [(f["step"], f["inputs"], f["logps"], f["mask"]) for f in probe.forwards],
        "loss/distill": [h["loss/distill"] for h in trainer.state.log_history if "loss/distill" in h],
        "averaged": [averaged[n].float().cpu() for n in names],
        "layouts": [
            type(reference.policy).__name__,
            type(reference.reference).__name__,
            type(averaging.primary.layout).__name__,
            type(distillation.teacher.layout).__name__,
        ],
        "ds_partitioned": all(
            hasattr(p, "ds_tensor") for _, p in recorder._adapter("ref") + recorder._adapter("ema_teacher")
        ),
        "ds_persist": [bool(getattr(p, "ds_persist", False)) for _, p in recorder._adapter("ref")],
        "world_size": world_size,
        "base_identical": len(recorder.base_before) > 0
        and all(torch.equal(a, b) for a, b in zip(recorder.base_before, recorder.base_after, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--persistence", default="0")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    result = run(cli.persistence, str(Path(cli.output_dir) / f"run-{cli.persistence}"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result, Path(cli.output_dir) / f"trajectory-{cli.persistence}.pt")


if __name__ == "__main__":
    main()
