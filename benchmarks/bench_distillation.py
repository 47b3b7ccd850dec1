"""Step-time cost of EMA-teacher self-distillation, side by side in one run (not a test).

Same model, data and seed for every variant; variants are interleaved over repeats, and the
fastest step of each (the estimate least disturbed by other processes) is compared with averaging
alone. The extra time per step is also expressed in units of one no-grad forward of the same
batch, the expected cost (one teacher forward, plus the LM-head projection of the completion tokens).

    python benchmarks/bench_distillation.py                # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_distillation.py --hidden 512 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.experiments.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer
from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback

warnings.filterwarnings("ignore")

VARIANTS: dict[str, dict[str, Any] | None] = {
    "averaging only": None,
    "+ distill (KL)": {"lambda_": 0.5, "temperature": 2.0},
    "+ distill (top-32)": {"lambda_": 0.5, "temperature": 2.0, "top_k": 32},
    "+ distill every 2": {"lambda_": 0.5, "temperature": 2.0, "distill_every": 2},
}


class StepTimer(TrainerCallback):
    """Wall time from one step's start to the next one's start."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def step_times(self, skip: int = 2) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


def _forward_time(trainer: Any, repeats: int = 5) -> float:
    """Median time of one no-grad eval-mode forward of a training batch (the teacher's cost)."""
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    model.train()
    return statistics.median(times[1:])


def run(distill: dict[str, Any] | None, hidden: int, steps: int) -> tuple[list[float], float, int]:
    """Train ``steps`` steps; return the step times, one forward's time and the teacher adapter's bytes."""
    from peft import LoraConfig

    tokenizer = tiny_tokenizer()
    timer = StepTimer()
    callbacks: list[Any] = [
        timer,
        WeightAveragingCallback(method="bema", update_every=1, eval=False, export_at_end=False),
    ]
    if distill is not None:
        callbacks.append(SelfDistillationCallback(**distill))
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            bf16=False,
            max_length=128,
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1000,
        )
        trainer = SFTTrainer(
            model=tiny_llama(tokenizer, seed=0, hidden_size=hidden),
            args=args,
            train_dataset=tiny_sft_dataset(256),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05),
            callbacks=callbacks,
        )
        if distill is not None:
            attach(trainer)
        trainer.train()
        teacher = callbacks[-1].teacher.memory_bytes() if distill is not None else 0
        return timer.step_times(), _forward_time(trainer), teacher


def compare_step_times(hidden: int = 256, steps: int = 12, repeats: int = 2) -> dict[str, float]:
    """Print median step time with and without distillation, their ratio, and the extra cost in forwards."""
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    forwards: list[float] = []
    memory: dict[str, int] = {}
    for _ in range(repeats):
        for name, distill in VARIANTS.items():  # interleaved, so drift hits every variant alike
            step_times, forward, memory[name] = run(distill, hidden, steps)
            times[name] += step_times
            forwards.append(forward)
    # The minimum is the estimate least disturbed by other processes (noise only adds time); the median is shown too.
    base = min(times["averaging only"])
    forward = min(forwards)
    print(
        f"tiny Llama, hidden={hidden}, 2 layers, LoRA r=16 all-linear, batch 8 x 128 tokens, {steps} steps x {repeats}"
    )
    print(f"one no-grad forward of a batch: {forward * 1e3:.1f} ms")
    header = f"{'variant':<20} {'min step (ms)':>14} {'median (ms)':>12} {'ratio':>7} {'extra (forwards)':>17} {'teacher MiB':>12}"
    print(header)
    ratios = {}
    for name in VARIANTS:
        best, median = min(times[name]), statistics.median(times[name])
        ratios[name] = best / base
        extra = (best - base) / forward
        print(
            f"{name:<20} {best * 1e3:>14.1f} {median * 1e3:>12.1f} {best / base:>7.3f} {extra:>17.2f} "
            f"{memory[name] / 2**20:>12.3f}"
        )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    compare_step_times(args.hidden, args.steps, args.repeats)


if __name__ == "__main__":
    main()
