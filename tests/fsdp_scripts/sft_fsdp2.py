"""One TRL SFTTrainer run with accelerate's FSDP2 plugin and ``WeightAveragingCallback``, on 2 CPU ranks.

Launched by tests/test_fsdp.py (with the repository root, tests/ and tests/deepspeed_scripts on PYTHONPATH)
as ``torchrun --nproc_per_node 2 sft_fsdp2.py --output_dir D [--no-reshard] [--resume_from CKPT]
[--state_dict_type SHARDED_STATE_DICT]`` (the trainer's own checkpoint format; default FULL_STATE_DICT), and
with ``--nproc_per_node 1`` to resume a 2-rank checkpoint on one rank.
``SFTConfig(fsdp=True, fsdp_config={"fsdp_version": 2, ...})``; accelerate's CPU gate is lifted by
:mod:`accelerate_cpu_fsdp` (see there: the one decision it changes). LoRA rank 3 (uneven shards),
BEMA primary + EMA with non-default settings, checkpoints at steps 3 and 6, an averaged evaluation
at step 6. Rank 0 writes ``D/report.json`` and ``D/trajectory.pt``:

* θ_t gathered with DTensor's ``full_tensor()`` at train begin, after every step and right after the
  averaged evaluation (float64);
* per rank: layout class, shadow bytes, the collectives counted inside the averaging callback's
  ``on_step_end`` (must be none), how often averaged folders were written, what the callback saw;
* the averager state right after a resume; the log history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ds_common import twin_args
from fsdp_common import (
    CollectiveCounter,
    base_parser,
    finish,
    full_weights,
    layout_facts,
    prepare_process,
    trainer_fsdp2_args,
)
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTTrainer

import trl_ema_plugin.integrations.trl.callback as callback_module
from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

AVERAGERS: list[dict[str, Any]] = [
    {"method": "bema", "update_every": 1, "update_after": 1, "lag": 2.0, "ema_power": 0.6, "bias_power": 0.3},
    {"method": "ema", "name": "ema", "decay": 0.7, "update_after": 1},
]
EVAL_BATCH, MAX_STEPS, SAVE_STEPS = 2, 6, 3


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer(), seed=0)
    torch.manual_seed(1)
    config = LoraConfig(r=3, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class Recorder(TrainerCallback):
    """θ_t at train begin and after every step (placed before the averaging callback)."""

    def __init__(self) -> None:
        self.trajectory: dict[int, dict[str, torch.Tensor]] = {}
        self.sharded: list[tuple[str, torch.nn.Parameter]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.sharded = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trajectory[state.global_step] = full_weights(self.sharded)

    def on_step_end(self, args, state, control, **kwargs):
        self.trajectory[state.global_step] = full_weights(self.sharded)


class Inspector(TrainerCallback):
    """Placed after the averaging callback: what it saw and did, and the collectives of its step hook."""

    def __init__(self, averaging: WeightAveragingCallback) -> None:
        self.averaging = averaging
        self.counter = CollectiveCounter()
        self.seen: dict[str, Any] = {}
        self.sharded: list[tuple[str, torch.nn.Parameter]] = []
        self.after_eval: dict[int, dict[str, torch.Tensor]] = {}
        self.state_at_begin: dict[str, dict[str, torch.Tensor]] = {}
        self.writes = 0
        original_step = averaging.on_step_end

        def counted_step(*args, **kwargs):
            with self.counter.counting():
                return original_step(*args, **kwargs)

        averaging.on_step_end = counted_step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from accelerate.state import AcceleratorState
        from torch.distributed.tensor import DTensor

        self.sharded = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        p = self.sharded[0][1]
        plugin = AcceleratorState().fsdp_plugin
        self.seen = {
            "model": type(model).__name__,
            "trainable_is_dtensor": isinstance(p, DTensor),
            "args_fsdp": bool(args.fsdp),
            "fsdp_config_version": args.fsdp_config.get("version"),
            "plugin_fsdp_version": plugin.fsdp_version,
            "state_dict_type": str(plugin.state_dict_type),
        }
        self.state_at_begin = {name: w.state_tensors() for name, w in self.averaging.weights.items()}
        original_write = callback_module.write_averaged_weights

        def counting_write(*args, **kwargs):
            self.writes += 1
            return original_write(*args, **kwargs)

        callback_module.write_averaged_weights = counting_write

    def on_evaluate(self, args, state, control, **kwargs):
        # the averaging callback's on_evaluate (swap in, evaluate, swap out) ran just before this one
        self.after_eval[state.global_step] = full_weights(self.sharded)


def run(output_dir: str, reshard_after_forward: bool, resume_from: str | None, state_dict_type: str) -> None:
    tokenizer = tiny_tokenizer()
    args = twin_args(  # the 2-rank twin run of the tests (global batch, order), under FSDP2
        output_dir, max_steps=MAX_STEPS, per_device_eval_batch_size=EVAL_BATCH, eval_strategy="steps",
        eval_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
        **trainer_fsdp2_args(reshard_after_forward, state_dict_type=state_dict_type),
    )  # fmt: skip
    averaging = WeightAveragingCallback(averagers=AVERAGERS)
    recorder, inspector = Recorder(), Inspector(averaging)
    trainer = SFTTrainer(
        model=lora_model(),
        args=args,
        train_dataset=tiny_sft_dataset(32, seed=0),
        eval_dataset=tiny_sft_dataset(8, seed=1),
        processing_class=tokenizer,
        callbacks=[recorder, averaging, inspector],
    )
    if resume_from is not None:
        attach(trainer)
    trainer.train(resume_from_checkpoint=resume_from)
    rank = dist.get_rank()
    mine = {
        **layout_facts(rank, averaging.weights),
        "collectives_in_step_hooks": inspector.counter.count,
        "writes": inspector.writes,
        "seen": inspector.seen,
        "wrapped": type(trainer.model_wrapped).__name__,
    }
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        out = Path(output_dir)
        report = {
            "ranks": ranks,
            "global_step": trainer.state.global_step,
            "log_history": trainer.state.log_history,
            "buffers": {name: list(w.averager.buffers) for name, w in averaging.weights.items()},
            "checkpoint_files": {c.name: sorted(p.name for p in c.iterdir()) for c in out.glob("checkpoint-*")},
        }
        (out / "report.json").write_text(json.dumps(report, indent=1))
        torch.save(
            {
                "trajectory": recorder.trajectory,
                "after_eval": inspector.after_eval,
                "state_at_begin": inspector.state_at_begin,
            },
            out / "trajectory.pt",
        )


def main() -> None:
    parser = base_parser()
    parser.add_argument("--resume_from", default=None)
    parser.add_argument(
        "--state_dict_type", default="FULL_STATE_DICT", choices=["FULL_STATE_DICT", "SHARDED_STATE_DICT"]
    )
    args = parser.parse_args()
    prepare_process()
    run(args.output_dir, not args.no_reshard, args.resume_from, args.state_dict_type)
    finish()


if __name__ == "__main__":
    main()
