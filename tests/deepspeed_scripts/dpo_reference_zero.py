"""One DPOTrainer + LoRA run with AveragedReferenceCallback (BEMA reference), under DeepSpeed ZeRO-3
(``run`` also serves the FSDP2 twin, tests/fsdp_scripts/dpo_reference_fsdp2.py).

Launched by tests/test_dpo_reference.py as
``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P dpo_reference_zero.py --persistence 0,default --output_dir D``:
one run per ``stage3_param_persistence_threshold`` (0: ``p.data`` empty between forwards; DeepSpeed's
default: the LoRA tensors persist). Rank 0 writes ``D/trajectory-<threshold>.pt``: the policy adapter θ_t and the ``"ref"`` adapter after every
optimizer step (gathered with DeepSpeed's own ``GatheredParameters``, independent of the layout under
test), the reference forwards DPOTrainer ran on rank 0 (inputs and log-probs), the layout classes,
and the base weights before and after training.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ds_common import GLOBAL_BATCH, cpu_training_args, gathered
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_ema_plugin.demos.tiny import tiny_dpo_dataset, tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.trl.dpo_reference import AveragedReferenceCallback
from trl_ema_plugin.model_helpers import is_dtensor

#: BEMA with non-default settings: it starts at step 1 and moves at every step; "ref" is written at steps 2 and 4
REFERENCE: dict[str, Any] = {
    "method": "bema", "ref_update_every": 2, "update_every": 1, "update_after": 1, "lag": 2.0,
    "ema_power": 0.6, "bias_power": 0.3, "multiplier": 1.5,
}  # fmt: skip
LORA: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
MAX_STEPS = 4


class Recorder(TrainerCallback):
    """θ_t and ref_t after every step; placed after AveragedReferenceCallback."""

    def __init__(self) -> None:
        self.base_before: list[torch.Tensor] = []
        self.base_after: list[torch.Tensor] = []
        self.theta: dict[int, list[torch.Tensor]] = {}
        self.ref: dict[int, list[torch.Tensor]] = {}
        self.step = 0

    def _record(self, step: int) -> None:
        self.step = step
        self.theta[step] = gathered(self.policy)
        self.ref[step] = gathered(self.reference)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # looked up here: DPOTrainer adds the "ref" adapter after this callback is built
        self.policy = [(n, p) for n, p in model.named_parameters() if ".default." in n]
        self.reference = [(n, p) for n, p in model.named_parameters() if ".ref." in n]
        self.base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
        self._record(state.global_step)
        self.base_before = gathered(self.base)

    def on_train_end(self, args, state, control, **kwargs):
        self.base_after = gathered(self.base)

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)


def run(persistence: str, output_dir: str, zero: int | None = 3, **overrides: Any) -> dict[str, Any]:
    """Train MAX_STEPS steps under ZeRO-3 with ``stage3_param_persistence_threshold`` = ``persistence``
    (``zero=None`` and ``overrides``: another engine, e.g. ``fsdp=True, fsdp_config=...``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=0)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(**LORA))
    args = cpu_training_args(
        output_dir, DPOConfig, zero=zero, persistence=persistence, max_steps=MAX_STEPS, learning_rate=1e-2,
        per_device_train_batch_size=GLOBAL_BATCH // world_size, max_length=64, logging_steps=1,
        gradient_checkpointing=False, seed=0, **overrides,
    )  # fmt: skip
    reference = AveragedReferenceCallback(**REFERENCE)
    recorder = Recorder()
    captured = []

    def hook(module, hook_args, kwargs, output):
        if torch.is_grad_enabled() or module.active_adapter != "ref":
            return
        inputs = {k: kwargs[k].detach().cpu().clone() for k in ("input_ids", "attention_mask")}
        if getattr(output, "log_probs", None) is not None:  # TRL 1.16: fused LM head
            logps, mask = output.log_probs.detach().cpu().clone(), (kwargs["labels"][:, 1:] != -100).cpu()
        else:  # TRL 1.9: logits
            ids = kwargs["input_ids"]
            logps = torch.log_softmax(output.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            logps, mask = logps.detach().cpu(), kwargs["attention_mask"][:, 1:].bool().cpu()
        captured.append((recorder.step, inputs, logps, mask))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=tiny_dpo_dataset(16, seed=0),
        processing_class=tokenizer,
        callbacks=[reference, recorder],
    )
    trainer.train()
    handle.remove()
    return {
        "theta": recorder.theta,
        "ref": recorder.ref,
        "captured": captured,
        "layouts": [type(reference.policy).__name__, type(reference.reference).__name__],
        "ds_partitioned": all(hasattr(p, "ds_tensor") for _, p in recorder.reference),
        "ds_persist": [bool(getattr(p, "ds_persist", False)) for _, p in recorder.reference],
        "dtensors": all(is_dtensor(p) for _, p in recorder.reference),
        "world_size": world_size,
        "base_identical": len(recorder.base_before) > 0
        and all(torch.equal(a, b) for a, b in zip(recorder.base_before, recorder.base_after, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--persistence", default="0,default", help="comma-separated thresholds, one run each")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    for persistence in cli.persistence.split(","):  # one launch, several engines: saves the start-up per run
        result = run(persistence, str(Path(cli.output_dir) / f"run-{persistence}"))
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(result, Path(cli.output_dir) / f"trajectory-{persistence}.pt")


if __name__ == "__main__":
    main()
