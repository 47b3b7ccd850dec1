"""Runnable example: GRPO + LoRA with a moving BEMA reference, the averaged policy and on-policy self-distillation
(CPU, seconds).

python integrations/trl/grpo_bema_reference.py

GRPOTrainer computes the reference log-probs once per generation batch (here one batch per 2 optimizer steps,
``steps_per_generation=2``) through the "ref" adapter. AveragedReferenceCallback writes the BEMA average of the
policy adapter into "ref" right before each batch's reference forward, when a sync step passed since its last
write; the example prints which average each batch read. WeightAveragingCallback averages the policy and, after
``attach``, evaluates it with GRPO's own evaluation: the averaged adapter samples and is rewarded
(``eval_bema_reward`` beside ``eval_reward``). SelfDistillationCallback adds λ·KL(teacher ‖ student) on the
sampled completion tokens, the teacher being that averaged policy.
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from trl_ema_plugin import AveragedReferenceCallback, SelfDistillationCallback, WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import letters_reward, tiny_llama, tiny_prompt_dataset, tiny_tokenizer


def main() -> None:
    torch.set_num_threads(1)  # a tiny model: threads only contend
    tokenizer = tiny_tokenizer()
    reference = AveragedReferenceCallback("bema", update_every=1, lag=10, ref_update_every=3)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = GRPOTrainer(
            model=tiny_llama(tokenizer),
            reward_funcs=letters_reward,  # fraction of a-z and spaces in the completion
            args=GRPOConfig(
                output_dir=output_dir,
                max_steps=12,
                per_device_train_batch_size=8,
                per_device_eval_batch_size=8,
                num_generations=8,
                max_completion_length=16,
                steps_per_generation=2,
                beta=0.05,  # > 0: a KL to the reference (GRPO's default 0.0 is refused)
                learning_rate=2e-2,
                eval_strategy="steps",
                eval_steps=6,
                logging_steps=6,
                report_to=[],
                use_cpu=True,
                bf16=False,
                disable_tqdm=True,
            ),
            train_dataset=tiny_prompt_dataset(64),
            eval_dataset=tiny_prompt_dataset(2, seed=1),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            callbacks=[
                reference,
                WeightAveragingCallback(method="bema", update_every=1, lag=10),
                SelfDistillationCallback(lambda_=0.1, warmup_steps=2),
            ],
        )
        attach(trainer)  # required for GRPO: adds "ref" and hooks the generation batches
        trainer.train()
        for generation_step, reference_step in reference.generations:
            read = "the initial adapter" if reference_step is None else f"BEMA of step {reference_step}"
            print(f"generation batch after step {generation_step:2d}: reference = {read}")
        keys = ("eval_reward", "eval_kl", "eval_bema_reward", "eval_bema_kl", "loss/distill")
        for entry in trainer.state.log_history:  # raw policy and averaged policy, each in its own entry
            if any(k in entry for k in keys):
                print({"step": entry["step"], **{k: round(entry[k], 6) for k in keys if k in entry}})


if __name__ == "__main__":
    main()
