"""Builders shared by the GRPO, RLOO and KTO tests: trainers on tiny models, and probes of the reference forward."""

from __future__ import annotations

import copy
from typing import Any

import oracles
import torch
from ds_common import cpu_training_args
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer

from trl_ema_plugin.demos.tiny import (
    letters_reward,
    tiny_kto_dataset,
    tiny_llama,
    tiny_prompt_dataset,
    tiny_qwen2,
    tiny_tokenizer,
)

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
#: BEMA with non-default settings: it starts at step 1 and moves at every step
BEMA = {"update_every": 1, "update_after": 1, "lag": 2.0, "ema_power": 0.6, "bias_power": 0.3, "multiplier": 1.5}
ARCHITECTURES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def base_model(architecture: str = "llama", seed: int = 0) -> torch.nn.Module:
    return ARCHITECTURES[architecture](tiny_tokenizer(), seed=seed)


def lora_policy(architecture: str = "llama", seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(PeftModel, a copy of its base model taken before wrapping)."""
    base = base_model(architecture, seed)
    initial = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(**LORA)), initial


def _defaults(**overrides: Any) -> dict[str, Any]:
    """4 optimizer steps of 4 examples, logged at each, on the CPU (:func:`ds_common.cpu_training_args`)."""
    values: dict[str, Any] = dict(
        max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=5e-2,
        logging_steps=1, seed=0,
    )  # fmt: skip
    return {**values, **overrides}


def generation_args(config_class: type, output_dir: str, **overrides: Any) -> Any:
    """GRPO/RLOO: 4 completions of ≤ 8 tokens per prompt, one prompt group per micro-batch, KL on (beta 0.1)."""
    values = _defaults(num_generations=4, max_completion_length=8, beta=0.1)
    return cpu_training_args(str(output_dir), config_class, **{**values, **overrides})


def generation_trainer(
    kind: str,
    output_dir: str,
    callbacks: list,
    *,
    model: torch.nn.Module | None = None,
    architecture: str = "llama",
    reward=letters_reward,
    eval_dataset=None,
    **overrides: Any,
) -> GRPOTrainer | RLOOTrainer:
    """GRPOTrainer (``kind="grpo"``) or RLOOTrainer on a tiny model; ``model`` None: ``peft_config=`` on a fresh base."""
    trainer_class, config_class = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[kind]
    peft: dict[str, Any] = {}
    if model is None:
        model = base_model(architecture)
        torch.manual_seed(1)
        peft = {"peft_config": LoraConfig(**LORA)}
    return trainer_class(
        model=model,
        reward_funcs=reward,
        args=generation_args(config_class, output_dir, **overrides),
        train_dataset=tiny_prompt_dataset(32, seed=0),
        eval_dataset=eval_dataset,
        processing_class=tiny_tokenizer(),
        callbacks=callbacks,
        **peft,
    )


def kto_trainer(
    output_dir: str, callbacks: list, *, model: torch.nn.Module, ref_model: Any = None, **overrides: Any
) -> KTOTrainer:
    values = _defaults(learning_rate=1e-2, max_length=64)
    return KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=cpu_training_args(str(output_dir), KTOConfig, **{**values, **overrides}),
        train_dataset=tiny_kto_dataset(16, seed=0),
        eval_dataset=tiny_kto_dataset(8, seed=1),
        processing_class=tiny_tokenizer(),
        callbacks=callbacks,
    )


# ------------------------------------------------------------------------------------------ probes
def adapter_values(model: torch.nn.Module, adapter: str) -> list[torch.Tensor]:
    """The adapter's tensors, in the order of the model's parameters."""
    return [p.detach().clone().float() for n, p in model.named_parameters() if f".{adapter}." in n]


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(actual) == len(expected) and actual
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=0)


class PolicyRecorder(TrainerCallback):
    """θ_t (the policy adapter) at train begin and after every optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.theta: dict[int, list[torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.theta[state.global_step] = adapter_values(self.model, "default")

    def on_step_end(self, args, state, control, **kwargs):
        self.theta[state.global_step] = adapter_values(self.model, "default")


class ReferenceProbe:
    """Every forward a TRL trainer runs through the ``"ref"`` adapter during training: the optimizer steps done
    (``trainer.state.global_step``), the ``"ref"`` adapter's values, the inputs and the log-probs it produced."""

    def __init__(self, trainer: Any, record_adapter: bool = True) -> None:
        self.trainer = trainer
        self.record_adapter = record_adapter  # False under ZeRO-3: the adapter is partitioned
        self.forwards: list[dict[str, Any]] = []
        self.model = trainer.model
        self.model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if torch.is_grad_enabled() or module.active_adapter != "ref" or not self.trainer.model.training:
            return
        ids = kwargs["input_ids"]
        inputs = {
            "input_ids": ids.detach().cpu().clone(),
            "attention_mask": kwargs["attention_mask"].detach().cpu().clone(),
        }
        if getattr(output, "log_probs", None) is not None:  # TRL 1.16: fused LM head, log-probs of the labels
            logps, mask = output.log_probs.detach().float().cpu(), (kwargs["labels"][:, 1:] != -100).cpu()
        else:  # TRL 1.9: logits of the last `logits_to_keep` positions (all of them without it)
            keep = kwargs.get("logits_to_keep") or ids.size(1)
            keep = keep if isinstance(keep, int) else ids.size(1)
            logps = next_token_logps(output.logits.detach(), ids[:, -keep:]).cpu()
            mask = kwargs["attention_mask"][:, ids.size(1) - keep + 1 :].bool().cpu()
        self.forwards.append(
            {
                "step": self.trainer.state.global_step,
                "ref": adapter_values(module, "ref") if self.record_adapter else None,
                "inputs": inputs,
                "logps": logps,
                "mask": mask,
            }
        )

    @property
    def steps(self) -> list[int]:
        return [f["step"] for f in self.forwards]


def next_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def assert_reference_log_probs(forward: dict[str, Any], adapter: list[torch.Tensor], initial_base) -> None:
    """The log-probs of one captured reference forward equal a fresh base model + ``adapter`` (end-aligned)."""
    hand_model = get_peft_model(copy.deepcopy(initial_base), LoraConfig(**LORA)).eval()
    with torch.no_grad():
        for p, v in zip([p for n, p in hand_model.named_parameters() if ".default." in n], adapter, strict=True):
            p.copy_(v)
        inputs = forward["inputs"]
        expected = next_token_logps(hand_model(**inputs).logits, inputs["input_ids"])
    logps, mask = forward["logps"], forward["mask"]
    expected = expected[:, -logps.size(1) :]
    assert bool(mask.any())
    torch.testing.assert_close(logps[mask], expected[mask], atol=1e-4, rtol=1e-5)


def hand_bema(theta: dict[int, list[torch.Tensor]], t: int, settings: dict[str, Any] = BEMA) -> list[torch.Tensor]:
    """BEMA of the recorded θ at step t, in float64 (:func:`oracles.bema`)."""
    return oracles.bema(theta, at=t, **settings)


def written_steps(generations: list[int], sync_every: int, starts_at: int) -> dict[int, int | None]:
    """The rule of the docs, by hand: generation g writes θ̂_g when a sync step (s > 0, s ≥ starts_at,
    s % sync_every == 0) lies in (last write, g]; the value it reads is that of the last write (None: θ_0)."""
    last, reads = None, {}
    for g in generations:
        lower = 0 if last is None else last
        if any(s >= starts_at and s % sync_every == 0 for s in range(lower + 1, g + 1)):
            last = g
        reads[g] = last
    return reads
