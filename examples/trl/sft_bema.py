"""Runnable example: SFTTrainer + LoRA + BEMA on a tiny model built in code (seconds on CPU).

python examples/trl/sft_bema.py
"""

from __future__ import annotations

import tempfile

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer


def main() -> None:
    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SFTTrainer(
            model=tiny_llama(tokenizer),
            args=SFTConfig(
                output_dir=output_dir,
                max_steps=40,
                per_device_train_batch_size=8,
                learning_rate=1e-2,
                eval_strategy="steps",
                eval_steps=20,
                save_steps=20,
                report_to=[],
                use_cpu=True,
                bf16=False,
                max_length=64,
                disable_tqdm=True,
            ),
            train_dataset=tiny_sft_dataset(256),
            eval_dataset=tiny_sft_dataset(32, seed=1),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
            # the one line: BEMA with TRL's hyper-parameter names, updated every step for a short run
            callbacks=[WeightAveragingCallback(method="bema", update_freq=1)],
        )
        attach(trainer)  # optional: every eval metric for the average, and resume from any path
        trainer.train()
        for entry in trainer.state.log_history:
            if "eval_loss" in entry or "eval_bema_loss" in entry:
                print({k: round(v, 4) for k, v in entry.items() if k.endswith("loss") or k == "step"})


if __name__ == "__main__":
    main()
