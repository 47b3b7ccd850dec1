"""One SFTTrainer run on the tiny model with WeightAveragingCallback, under DeepSpeed or not: LoRA, or
full fine-tuning with ``--full``.

Launched by tests/test_deepspeed.py as
``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P sft_zero.py --zero 3 --output_dir D``
(2 ranks), or imported and called in-process for the 1-process twin and the 2 → 1 resume.
Rank 0 writes ``D/report.json`` and ``D/trajectory.pt``:

* the weights θ_t gathered at train begin and after every optimizer step (DeepSpeed's own
  ``GatheredParameters`` under ZeRO-3, independent of the layout under test);
* the weights gathered again after each averaged evaluation (the swap must restore them);
* per rank: layout class, shadow bytes per averager, how often the layout gathered and how
  often the averaged folders were written;
* the averager state right after a resume, the log history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ds_common import stable_gather, twin_args
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTTrainer

import trl_ema_plugin.integrations.trl.callback as callback_module
from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

#: the averagers of every run: BEMA (primary) and EMA, with non-default settings so both move
AVERAGERS: list[dict[str, Any]] = [
    {"method": "bema", "update_every": 1, "update_after": 1, "lag": 2.0, "ema_power": 0.6, "bias_power": 0.3},
    {"method": "ema", "name": "ema", "decay": 0.7, "update_after": 1},
]
EVAL_BATCH = 2


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: where two consecutive ZeRO-3 gathers disagreed (see gathered_trainable)
REGATHERS: list[str] = []


def gathered_trainable(model: torch.nn.Module, where: str = "") -> dict[str, torch.Tensor]:
    """Full trainable weights through DeepSpeed's own gather (see ds_common.stable_gather); retries are
    reported in ``REGATHERS``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return stable_gather(named, on_retry=lambda: REGATHERS.append(where))


class Recorder(TrainerCallback):
    """θ_t at train begin and after every step (placed before the averaging callback)."""

    def __init__(self) -> None:
        self.trajectory: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trajectory[state.global_step] = gathered_trainable(model, f"train begin {state.global_step}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trajectory[state.global_step] = gathered_trainable(model, f"step {state.global_step}")


class Inspector(TrainerCallback):
    """Placed after the averaging callback: what it left behind, and how often it gathered/wrote."""

    def __init__(self, averaging: WeightAveragingCallback) -> None:
        self.averaging = averaging
        self.after_eval: dict[int, dict[str, torch.Tensor]] = {}
        self.state_at_begin: dict[str, dict[str, torch.Tensor]] = {}
        self.gathers = 0
        self.gathers_in_steps = 0
        self.writes = 0
        self._in_step = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layout = self.averaging.primary.layout
        original_gather = layout.gather

        def counting_gather(local):
            self.gathers += 1
            return original_gather(local)

        layout.gather = counting_gather
        self.state_at_begin = {name: w.state_tensors() for name, w in self.averaging.weights.items()}
        self.gathers = 0  # the state_tensors() calls above do not count
        original_write = callback_module.write_averaged_weights

        def counting_write(*args, **kwargs):
            self.writes += 1
            return original_write(*args, **kwargs)

        callback_module.write_averaged_weights = counting_write
        self._original_write = original_write

    def on_step_begin(self, args, state, control, **kwargs):
        self._gathers_before_step = self.gathers

    def on_step_end(self, args, state, control, **kwargs):
        # the averaging callback ran its on_step_end (the update) just before this one
        self.gathers_in_steps += self.gathers - self._gathers_before_step

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.after_eval[state.global_step] = gathered_trainable(model, f"after eval {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        callback_module.write_averaged_weights = self._original_write  # after the final export


def build_trainer(
    output_dir: str,
    zero: int | None,
    persistence: str = "default",
    max_steps: int = 6,
    save_steps: int = 3,
    full: bool = False,
) -> tuple[SFTTrainer, WeightAveragingCallback, Recorder, Inspector]:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, seed=0)
    torch.manual_seed(1)  # LoRA A initialisation: identical on every rank and in the 1-process twin
    if not full:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    args = twin_args(
        output_dir, zero, persistence, max_steps=max_steps, per_device_eval_batch_size=EVAL_BATCH,
        eval_strategy="steps", eval_steps=max_steps, save_strategy="steps", save_steps=save_steps,
    )  # fmt: skip
    averaging = WeightAveragingCallback(averagers=AVERAGERS)
    recorder = Recorder()
    inspector = Inspector(averaging)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=tiny_sft_dataset(32, seed=0),
        eval_dataset=tiny_sft_dataset(8, seed=1),
        processing_class=tokenizer,
        callbacks=[recorder, averaging, inspector],
    )
    return trainer, averaging, recorder, inspector


def run(
    output_dir: str,
    zero: int | None = None,
    persistence: str = "default",
    resume_from: str | None = None,
    max_steps: int = 6,
    full: bool = False,
) -> dict[str, Any]:
    """Train, then write (rank 0) ``report.json`` and ``trajectory.pt`` into ``output_dir``."""
    trainer, averaging, recorder, inspector = build_trainer(output_dir, zero, persistence, max_steps, full=full)
    if resume_from is not None:
        attach(trainer)  # the checkpoint lies outside output_dir
    trainer.train(resume_from_checkpoint=resume_from)
    rank, world_size = world()
    layout = averaging.primary.layout
    mine = {
        "rank": rank,
        "layout": type(layout).__name__,
        "shadow_bytes": {name: w.memory_bytes() for name, w in averaging.weights.items()},
        "local_numel": sum(layout.local_sizes()),
        "full_numel": layout.full_numel(),
        "gathers": inspector.gathers,
        "gathers_in_steps": inspector.gathers_in_steps,
        "writes": inspector.writes,
        "persisted": [bool(getattr(p, "ds_persist", False)) for p in layout.params],
        "regathers": REGATHERS,
    }
    ranks = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    report = {
        "world_size": world_size,
        "zero": zero,
        "persistence": persistence,
        "global_step": trainer.state.global_step,
        "ranks": ranks,
        "log_history": trainer.state.log_history,
        "buffers": {name: list(w.averager.buffers) for name, w in averaging.weights.items()},
    }
    if rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "trajectory": recorder.trajectory,
                "after_eval": inspector.after_eval,
                "state_at_begin": inspector.state_at_begin,
            },
            Path(output_dir) / "trajectory.pt",
        )
        (Path(output_dir) / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None)
    parser.add_argument("--persistence", default="default", help="stage3_param_persistence_threshold, or 'default'")
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args, _ = parser.parse_known_args(argv)  # the deepspeed launcher adds --local_rank
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args.output_dir, args.zero, args.persistence, args.resume_from, args.max_steps, args.full)


if __name__ == "__main__":
    main(sys.argv[1:])
