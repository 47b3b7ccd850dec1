"""One SFTTrainer run with PostHocEMACallback, under DeepSpeed or not: the post-hoc twin of sft_zero.py.

Launched by tests/test_posthoc_deepspeed.py as ``deepspeed --num_gpus 2 posthoc_zero.py --zero 3 --output_dir D``
(2 ranks), run under FSDP2 by tests/fsdp_scripts/posthoc_fsdp2.py, or imported and called in-process for the 1-process twin and the 2 → 1 resume. The model, LoRA, data
and batches are sft_zero.py's (the same global batch on 2 ranks and in 1 process); checkpoints at step 3. Rank 0
writes ``D/report.json`` (per rank: layout, EMA bytes, the steps at which the recorder gathered and how often, the
snapshot files it wrote) and ``D/trajectory.pt`` (θ_t gathered by DeepSpeed's own gather at every step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ds_common import twin_args
from peft import LoraConfig, get_peft_model
from sft_zero import Recorder, world
from transformers import TrainerCallback
from trl import SFTTrainer

import trl_ema_plugin.posthoc.recorder as recorder_module
from trl_ema_plugin import PostHocEMACallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

#: σ_rel 0.05 and 0.10 from step 1, a snapshot at steps 3, 5 and the last one (6)
SETTINGS: dict[str, Any] = {"sigma_rels": [0.05, 0.10], "every": 2, "update_after": 1}


class Inspector(TrainerCallback):
    """Placed after the recorder: counts its gathers per step and the files this rank writes."""

    def __init__(self, posthoc: PostHocEMACallback) -> None:
        self.posthoc = posthoc
        self.gathers: Counter[int] = Counter()
        self.writes: list[str] = []
        self._step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        layout = self.posthoc.recorder.layout
        original_gather = layout.gather

        def counting_gather(local):
            self.gathers[self._step] += 1
            return original_gather(local)

        layout.gather = counting_gather
        self._originals = {n: getattr(recorder_module, n) for n in ("write_snapshot", "write_theta0")}
        for name, original in self._originals.items():

            def counting(*a, _original=original, **k):
                path = _original(*a, **k)
                self.writes.append(Path(path).name)
                return path

            setattr(recorder_module, name, counting)
        self._step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1  # the step whose on_step_end (and on_save) follows

    def on_train_end(self, args, state, control, **kwargs):
        for name, original in self._originals.items():  # the next in-process run counts afresh
            setattr(recorder_module, name, original)


def run(
    output_dir: str, zero: int | None = None, persistence: str = "default", resume_from: str | None = None,
    max_steps: int = 6, **overrides: Any,
) -> dict[str, Any]:  # fmt: skip
    """``overrides``: more training arguments (another engine: ``fsdp=True, fsdp_config=...``)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, seed=0)
    torch.manual_seed(1)  # LoRA A initialisation: identical on every rank and in the 1-process twin
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    args = twin_args(
        output_dir, zero, persistence, max_steps=max_steps, save_strategy="steps", save_steps=3, **overrides
    )
    posthoc = PostHocEMACallback(**SETTINGS)
    recorder, inspector = Recorder(), Inspector(posthoc)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=tiny_sft_dataset(32, seed=0),
        processing_class=tokenizer,
        callbacks=[recorder, posthoc, inspector],
    )
    if resume_from is not None:
        attach(trainer)  # the checkpoint lies outside output_dir
    trainer.train(resume_from_checkpoint=resume_from)
    rank, world_size = world()
    mine = {
        "rank": rank,
        "layout": type(posthoc.recorder.layout).__name__,
        "ema_bytes": sum(w.memory_bytes() for w in posthoc.recorder.weights.values()),
        "gathers": {str(step): count for step, count in sorted(inspector.gathers.items())},
        "writes": inspector.writes,
    }
    ranks = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"trajectory": recorder.trajectory}, Path(output_dir) / "trajectory.pt")
        report = {"world_size": world_size, "zero": zero, "ranks": ranks, "every": posthoc.recorder.every}
        (Path(output_dir) / "report.json").write_text(json.dumps(report, indent=1))
    return {"ranks": ranks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None)
    parser.add_argument("--persistence", default="default", help="stage3_param_persistence_threshold, or 'default'")
    parser.add_argument("--max_steps", type=int, default=6)
    args, _ = parser.parse_known_args(argv)  # the deepspeed launcher adds --local_rank
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args.output_dir, args.zero, args.persistence, max_steps=args.max_steps)


if __name__ == "__main__":
    main(sys.argv[1:])
