"""Small builders shared by the TRL tests: a trainer on the tiny model, and a weight recorder (for tests/oracles.py)."""

from __future__ import annotations

from typing import Any

import torch
from ds_common import TINY_RUN, cpu_training_args
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer


def lora_config(kind: str = "lora", **overrides: Any) -> LoraConfig:
    """r=4 on every linear layer; ``kind``: "lora", "dora" or "rslora"."""
    values = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    return LoraConfig(**values, use_dora=kind == "dora", use_rslora=kind == "rslora", **overrides)


def sft_args(output_dir: str, **overrides: Any) -> SFTConfig:
    """The tests' default SFT run: :data:`ds_common.TINY_RUN`, 6 steps of 4 examples, on the CPU."""
    values = {**TINY_RUN, "max_steps": 6, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}
    return cpu_training_args(output_dir, **{**values, **overrides})


def sft_trainer(
    output_dir: str,
    callbacks: list,
    peft: str | LoraConfig | None = "lora",
    model: torch.nn.Module | None = None,
    **overrides: Any,
) -> SFTTrainer:
    """SFTTrainer on the tiny Llama (or ``model``); ``peft`` names a LoRA kind or is a LoraConfig."""
    tokenizer = tiny_tokenizer()
    return SFTTrainer(
        model=model if model is not None else tiny_llama(tokenizer, seed=0),
        args=sft_args(output_dir, **overrides),
        train_dataset=tiny_sft_dataset(32, seed=0),
        eval_dataset=tiny_sft_dataset(8, seed=1),
        processing_class=tokenizer,
        peft_config=lora_config(peft) if isinstance(peft, str) else peft,
        callbacks=callbacks,
    )


class WeightRecorder(TrainerCallback):
    """Records the trainable weights θ_t at train begin (t = global_step) and after every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def snapshot(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = self.snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = self.snapshot(model)


def logged(trainer, key: str) -> list[float]:
    """The values of ``key`` in the trainer's log history, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def params(model, adapter: str) -> dict[str, torch.Tensor]:
    """Copies of the parameters of PEFT adapter ``adapter``, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def grads(model) -> dict[str, torch.Tensor]:
    """Copies of the gradients the model holds, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
