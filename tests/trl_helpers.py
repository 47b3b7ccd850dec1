"""Small builders shared by the TRL tests: a trainer on the tiny model, and a weight recorder."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer


def lora_config(kind: str = "lora") -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        lora_dropout=0.0,
        use_dora=kind == "dora",
        use_rslora=kind == "rslora",
    )


def sft_args(output_dir: str, **overrides: Any) -> SFTConfig:
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=48,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return SFTConfig(**values)


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


def hand_bema(
    weights: dict[int, dict[str, torch.Tensor]],
    *,
    update_after: int,
    every: int,
    lag: float,
    multiplier: float = 1.0,
    ema_power: float = 0.5,
    bias_power: float = 0.2,
) -> dict[str, torch.Tensor]:
    """BEMA by the paper's formula, in float64, from recorded weights."""
    last_step = max(weights)
    theta0 = {n: w.double() for n, w in weights[update_after].items()}
    ema = {n: w.clone() for n, w in theta0.items()}
    last = update_after
    for t in range(update_after + 1, last_step + 1):
        if (t - update_after) % every:
            continue
        beta = (lag + multiplier * t) ** -ema_power
        ema = {n: (1 - beta) * ema[n] + beta * weights[t][n].double() for n in ema}
        last = t
    alpha = (lag + multiplier * last) ** -bias_power
    return {n: ema[n] + alpha * (weights[last][n].double() - theta0[n]) for n in ema}


def hand_ema(
    weights: dict[int, dict[str, torch.Tensor]], *, update_after: int, every: int, decay: float
) -> dict[str, torch.Tensor]:
    ema = {n: w.double() for n, w in weights[update_after].items()}
    for t in range(update_after + 1, max(weights) + 1):
        if (t - update_after) % every == 0:
            ema = {n: decay * ema[n] + (1 - decay) * weights[t][n].double() for n in ema}
    return ema


def logged(trainer, key: str) -> list[float]:
    """The values of ``key`` in the trainer's log history, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def params(model, adapter: str) -> dict[str, torch.Tensor]:
    """Copies of the parameters of PEFT adapter ``adapter``, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def grads(model) -> dict[str, torch.Tensor]:
    """Copies of the gradients the model holds, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
