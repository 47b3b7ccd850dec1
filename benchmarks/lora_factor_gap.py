"""What do we average for LoRA? The factors A and B, not the product ΔW = (α/r)·B·A.

EMA(B)·EMA(A) differs from EMA(B·A): the product of averages carries cross terms
Cov(B, A) that the average of products keeps. This script trains a tiny LoRA model,
records every step, and prints the relative gap

    gap = ‖EMA(B)·EMA(A) − EMA(B·A)‖_F / ‖EMA(B·A)‖_F

per decay, plus the gap between the raw ΔW and EMA(B·A) for scale. (Not a test.)

    python benchmarks/lora_factor_gap.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deepspeed_scripts"))  # shared with the tests
from ds_common import cpu_training_args

warnings.filterwarnings("ignore")


class FactorRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone().double() for n, p in model.named_parameters() if p.requires_grad})


def main(steps: int = 60, decays: tuple[float, ...] = (0.9, 0.99)) -> None:
    tokenizer = tiny_tokenizer()
    recorder = FactorRecorder()
    with tempfile.TemporaryDirectory() as out:
        args = cpu_training_args(out, max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3, max_length=64)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        SFTTrainer(
            model=tiny_llama(tokenizer),
            args=args,
            train_dataset=tiny_sft_dataset(256),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[recorder],
        ).train()
    a_names = sorted(n for n in recorder.steps[0] if "lora_A" in n)
    print(f"{len(a_names)} LoRA pairs, {steps} steps, r=8")
    print(f"{'decay':>6} {'gap EMA(B)EMA(A) vs EMA(BA)':>28} {'raw BA vs EMA(BA)':>19}")
    for decay in decays:
        num = den = raw = 0.0
        for a_name in a_names:
            b_name = a_name.replace("lora_A", "lora_B")
            ema_a, ema_b = recorder.steps[0][a_name].clone(), recorder.steps[0][b_name].clone()
            ema_ba = ema_b @ ema_a
            for step in recorder.steps[1:]:
                ema_a.lerp_(step[a_name], 1 - decay)
                ema_b.lerp_(step[b_name], 1 - decay)
                ema_ba.lerp_(step[b_name] @ step[a_name], 1 - decay)
            last = recorder.steps[-1]
            num += float((ema_b @ ema_a - ema_ba).norm() ** 2)
            den += float(ema_ba.norm() ** 2)
            raw += float((last[b_name] @ last[a_name] - ema_ba).norm() ** 2)
        print(f"{decay:>6} {(num / den) ** 0.5:>28.4f} {(raw / den) ** 0.5:>19.4f}")


if __name__ == "__main__":
    main()
