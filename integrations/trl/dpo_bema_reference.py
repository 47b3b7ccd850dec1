"""Runnable example: DPO + LoRA with a moving reference, the BEMA average of the policy adapter (CPU, seconds).

python integrations/trl/dpo_bema_reference.py

The reference policy is the base model plus the "ref" adapter. TRL's DPOTrainer adds that adapter
(a frozen copy of the starting policy adapter) when it is given a PeftModel; AveragedReferenceCallback
writes the BEMA average of the policy adapter into it every ``ref_update_every`` steps. The frozen
base weights are never written. WeightAveragingCallback, independent of it, also averages the policy
and evaluates/saves the averaged policy (``eval_bema_loss``, ``output_dir/averaged/``).
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_ema_plugin import AveragedReferenceCallback, WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_dpo_dataset, tiny_llama, tiny_tokenizer


class ReferenceMoves(TrainerCallback):
    """Print how far the "ref" adapter moved at each step (it moves on sync steps only)."""

    def __init__(self, model) -> None:
        self.model = model
        self.previous: list[torch.Tensor] | None = None

    def _ref(self) -> list[torch.Tensor]:
        return [p.detach().clone() for n, p in self.model.named_parameters() if ".ref." in n]

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = self._ref()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._ref()
        moved = sum(float((a - b).norm()) for a, b in zip(now, self.previous, strict=True))
        if moved > 0:
            print(f"step {state.global_step:3d}: reference synced, ||Δref|| = {moved:.4f}")
        self.previous = now


def main() -> None:
    torch.set_num_threads(1)  # a tiny model: threads only contend
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    # a PeftModel: DPOTrainer then adds the "ref" adapter (with peft_config=..., call attach(trainer) instead)
    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(
                output_dir=output_dir,
                max_steps=30,
                per_device_train_batch_size=8,
                learning_rate=5e-3,
                eval_strategy="steps",
                eval_steps=15,
                save_steps=15,
                logging_steps=5,
                report_to=[],
                use_cpu=True,
                bf16=False,
                max_length=64,
                gradient_checkpointing=False,
                disable_tqdm=True,
            ),
            train_dataset=tiny_dpo_dataset(128),
            eval_dataset=tiny_dpo_dataset(16, seed=1),
            processing_class=tokenizer,
            callbacks=[
                # the reference: BEMA of the policy adapter, updated every step, written into "ref" every 10 steps
                AveragedReferenceCallback("bema", update_every=1, lag=10, ref_update_every=10),
                # independently: the averaged policy, evaluated and saved
                WeightAveragingCallback(method="bema", update_freq=1),
                ReferenceMoves(model),
            ],
        )
        attach(trainer)  # checks the DPO settings now, and every eval metric for the averaged policy
        trainer.train()
        keys = ("eval_loss", "eval_rewards/margins", "eval_bema_loss", "eval_bema_rewards/margins")
        for entry in trainer.state.log_history:  # raw policy and averaged policy, each in its own entry
            if any(k in entry for k in keys):
                print({"step": entry["step"], **{k: round(entry[k], 4) for k in keys if k in entry}})


if __name__ == "__main__":
    main()
