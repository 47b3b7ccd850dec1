"""Per-step overhead of weight averaging, measured side by side in one run (not a test).

Same model, data and seed for every variant; variants are interleaved over repeats and the
median step time is compared with plain training. Step time is CPU time of the process with one
torch thread, so other load on the machine does not leak into the ratios. Prints a table of ratios
and the shadow memory.

    python benchmarks/bench_overhead.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_overhead.py --hidden 512 --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import BEMACallback, SFTTrainer

from trl_ema_plugin import WeightAveragingCallback
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deepspeed_scripts"))  # shared with the tests
from ds_common import cpu_training_args

warnings.filterwarnings("ignore")


class StepTimer(TrainerCallback):
    """CPU time from one step's start to the next one's start (includes every callback's on_step_end)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.process_time())

    def on_train_end(self, args, state, control, **kwargs):
        self.starts.append(time.process_time())

    def step_times(self, skip: int = 2) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)


def make_callback(variant: str):
    if variant == "none":
        return None
    if variant == "trl-bema":
        return BEMACallback(update_freq=1, device="cpu")
    method = variant.split("-")[1]
    kwargs = {"update_every": 1} if method != "ema" else {}
    return WeightAveragingCallback(method=method, eval=False, export_at_end=False, **kwargs)


def shadow_bytes(callback, model) -> int:
    if callback is None:
        return 0
    if isinstance(callback, BEMACallback):
        running = sum(p.numel() * p.element_size() for p in callback.running_model.parameters())
        buffers = sum(t.numel() * t.element_size() for t in callback.theta0_params + callback.ema_params)
        return running + buffers
    return sum(w.memory_bytes() for w in callback.weights.values())


def run(variant: str, peft: bool, hidden: int, steps: int) -> tuple[list[float], int, int]:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=0, hidden_size=hidden)
    timer, callback = StepTimer(), make_callback(variant)
    with tempfile.TemporaryDirectory() as out:
        args = cpu_training_args(
            out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3, max_length=128, logging_steps=1000
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=tiny_sft_dataset(256),
            processing_class=tokenizer,
            peft_config=lora_config() if peft else None,
            callbacks=[timer] + ([callback] if callback else []),
        )
        trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        return timer.step_times(), shadow_bytes(callback, trainer.model), trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setups = {
        "full fine-tuning": (False, ["none", "ours-ema", "ours-bema", "trl-bema"]),
        "LoRA r=16 (all linear)": (True, ["none", "ours-ema", "ours-bema", "ours-dema", "ours-ouema"]),
    }
    print(
        f"tiny Llama, hidden={args.hidden}, 2 layers, batch 8 x 128 tokens, {args.steps} steps x {args.repeats} repeats"
    )
    for title, (peft, variants) in setups.items():
        times: dict[str, list[float]] = {v: [] for v in variants}
        memory: dict[str, int] = {}
        trainable = 0
        for _ in range(args.repeats):
            for variant in variants:  # interleaved, so drift hits every variant alike
                step_times, memory[variant], trainable = run(variant, peft, args.hidden, args.steps)
                times[variant] += step_times
        base = statistics.median(times["none"])
        print(f"\n{title}: {trainable / 1e6:.2f} M trainable parameters ({trainable * 4 / 2**20:.1f} MiB fp32)")
        print(f"{'variant':<12} {'median step (ms)':>17} {'ratio to none':>14} {'shadow MiB':>11} {'copies':>7}")
        for variant in variants:
            median = statistics.median(times[variant])
            copies = memory[variant] / (trainable * 4) if trainable else 0
            print(
                f"{variant:<12} {median * 1e3:>17.1f} {median / base:>14.3f} {memory[variant] / 2**20:>11.2f} {copies:>7.2f}"
            )


if __name__ == "__main__":
    main()
