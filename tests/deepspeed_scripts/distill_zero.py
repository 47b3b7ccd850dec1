"""SFTTrainer + LoRA + EMA-teacher self-distillation on the tiny model, under DeepSpeed ZeRO or in one process.

Launched by tests/test_distillation_deepspeed.py as
``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P distill_zero.py --zero 3 --output_dir D``
(2 ranks), or imported and called in-process for the 1-process twin (same global batch, same order);
``run`` also serves the FSDP2 twin, tests/fsdp_scripts/distill_fsdp2.py. Rank 0 writes ``D/report.json``:
the logged ``loss``, ``loss/task``, ``loss/distill``, the number of teacher forwards, the teacher's layout
class and the bytes of the teacher adapter on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from ds_common import twin_args
from peft import LoraConfig, get_peft_model
from trl import SFTTrainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer
from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback


def run(
    output_dir: str, zero: int | None = None, persistence: str = "default", max_steps: int = 3, **overrides: Any
) -> dict[str, Any]:
    """``overrides``: more training arguments (another engine: ``fsdp=True, fsdp_config=...``)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=0)
    torch.manual_seed(1)  # identical LoRA initialisation on every rank and in the twin
    # init_lora_weights=False: random lora_B, so a teacher adapter that was never written differs from the student
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    args = twin_args(output_dir, zero, persistence, max_steps=max_steps, **overrides)
    distillation = SelfDistillationCallback(lambda_=1.0, temperature=2.0)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=tiny_sft_dataset(32, seed=0),
        processing_class=tokenizer,
        callbacks=[WeightAveragingCallback(method="ema", decay=0.5), distillation],
    )
    attach(trainer)
    trainer.train()
    history = trainer.state.log_history
    report = {key: [entry[key] for entry in history if key in entry] for key in ("loss", "loss/task", "loss/distill")}
    teacher = distillation.teacher
    report.update(
        teacher_forwards=distillation.teacher_forwards,
        layout=type(teacher.layout).__name__,
        teacher_bytes=teacher.memory_bytes(),
    )
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "report.json"), "w") as handle:
            json.dump(report, handle)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--zero", type=int, default=None)
    parser.add_argument("--persistence", default="default")
    parser.add_argument("--max_steps", type=int, default=3)
    options, _ = parser.parse_known_args()  # the launcher adds --local_rank
    run(options.output_dir, options.zero, options.persistence, options.max_steps)
