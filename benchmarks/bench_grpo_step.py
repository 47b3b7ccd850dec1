"""Seconds per GRPO step on SmolLM2-135M-Instruct (LoRA r=16, CPU): fixed reference vs BEMA reference vs BEMA
reference + self-distillation from the averaged policy. Sizes the GRPO evidence study before it runs.

python benchmarks/bench_grpo_step.py [--steps 3] [--completions 4] [--length 64] [--threads 2]

Prompts are stdlib function signatures + docstrings (``experiments/stdlib_data.py``, train split); the reward
(never tuned here) is 1 when ``prompt + completion`` parses with :mod:`ast`. Every step samples one prompt's
``--completions`` completions of up to ``--length`` tokens (one generation batch per optimizer step, TRL's
default), computes the reference log-probs (``beta=0.04``), and takes one optimizer step. The first step of
each variant (start-up) is not counted. Prints CPU seconds per step (this process, all its threads: the
machine's other jobs do not inflate it; divide by the cores a run gets for wall time), median and range, and
the ratio to the fixed reference.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.smollm2 import load_smollm2
from experiments.stdlib_data import sft_rows
from trl_ema_plugin import AveragedReferenceCallback, SelfDistillationCallback, WeightAveragingCallback, attach


def parses(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the signature + docstring + completed body is valid Python, else 0.0."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        try:
            ast.parse(prompt + completion)
            scores.append(1.0)
        except (SyntaxError, ValueError):
            scores.append(0.0)
    return scores


class StepTimer(TrainerCallback):
    """CPU seconds of this process per optimizer step (all its threads): robust to other jobs on the machine."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.process_time() - self.start)


def run(variant: str, steps: int, completions: int, length: int) -> tuple[list[float], float]:
    """Step times (start-up step dropped) and the mean completion length in tokens."""
    from datasets import Dataset

    model, tokenizer = load_smollm2()
    rows = [r for r in sft_rows("train", seed=0) if len(r["prompt"]) < 400][: steps + 1]
    prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    timer = StepTimer()
    callbacks: list = [timer]
    if variant != "fixed":
        callbacks.append(AveragedReferenceCallback("bema", update_every=1, ref_update_every=1))
    if variant == "bema+distill":
        callbacks += [WeightAveragingCallback(method="bema", update_every=1, eval=False), SelfDistillationCallback()]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=parses,
            args=GRPOConfig(
                output_dir=output_dir, max_steps=steps + 1, per_device_train_batch_size=completions,
                num_generations=completions, max_completion_length=length, beta=0.04, learning_rate=1e-4,
                use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            ),
            train_dataset=prompts,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=callbacks,
        )  # fmt: skip
        if variant != "fixed":
            attach(trainer)
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return timer.times[1:], statistics.mean(lengths[1:] or lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    baseline = None
    for variant in ("fixed", "bema", "bema+distill"):
        times, mean_length = run(variant, cli.steps, cli.completions, cli.length)
        median = statistics.median(times)
        baseline = baseline or median
        print(
            f"{variant:>13}: {median:6.2f} CPU s/step (range {min(times):.2f}–{max(times):.2f}, {len(times)} steps), "
            f"× {median / baseline:.2f} of fixed; completions of {mean_length:.0f} tokens on average",
            flush=True,
        )


if __name__ == "__main__":
    main()
