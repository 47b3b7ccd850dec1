"""One run of the GRPO study (d): SmolLM2 (or the tiny Llama) + LoRA, TRL's ``GRPOTrainer``, the code reward.

A run returns a JSON-able dict: per-step curves from TRL's logs (``reward``, its parts, ``kl`` to the run's own
reference, completion lengths), the KL to the *initial* model measured at each generation batch
(:class:`InitialKLProbe`), CPU and wall seconds per step, and TRL's evaluation on the held-out prompts.
Protocol: docs/evidence.md, study (d).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed

from trl_ema_plugin import AveragedReferenceCallback, SelfDistillationCallback, WeightAveragingCallback, attach

from .code_reward import REWARD_FUNCTIONS, body_parses
from .runner import ModelScale, StepProbe, load_model, load_tokenizer, median_seconds, named_preset
from .stdlib_data import stdlib_sft_dataset

#: TRL's per-step log keys kept as curves (``rewards/<function>/mean`` for each reward function)
LOGGED = (
    "reward",
    *(f"rewards/{f.__name__}/mean" for f in REWARD_FUNCTIONS),
    "kl",
    "completions/mean_length",
    "completions/clipped_ratio",
    "loss",
    "loss/distill",
)


@dataclass(frozen=True)
class GRPOScale(ModelScale):
    """Sizes of the GRPO study. ``full`` is the documented run; ``smoke`` and ``tiny`` only check that it works."""

    name: str
    model: str = "smollm2"
    steps: int = 96
    train_prompts: int = 32
    eval_prompts: int = 16
    completions: int = 4  # per prompt: num_generations, and the per-device batch (one prompt per step)
    max_completion_length: int = 64
    max_prompt_tokens: int = 160
    max_reference_tokens: int = 48
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 1e-4
    beta: float = 0.04
    distill_lambda: float = 0.1
    seed: int = 0
    #: appended to every prompt: SmolLM2's tokenizer writes an indented line as "\n   " + " return", so a prompt
    #: that ends in "\n" stops on a token boundary the model rarely saw (docs/evidence.md, study (d))
    indent_prime: str = "   "


PRESETS: dict[str, GRPOScale] = {
    "full": GRPOScale("full"),
    "smoke": GRPOScale("smoke", steps=2, train_prompts=2, eval_prompts=2),
    # the byte-level tokenizer spends a token per character: looser length filters, short completions
    "tiny": GRPOScale(
        "tiny", model="tiny", steps=2, train_prompts=2, eval_prompts=2, max_completion_length=8,
        max_prompt_tokens=400, max_reference_tokens=100, lora_r=4, lora_alpha=8, learning_rate=5e-3,
    ),
}  # fmt: skip


def scale_named(name: str) -> GRPOScale:
    return named_preset(PRESETS, name)


# ------------------------------------------------------------------------------------------ data
def code_prompts(tokenizer: Any, scale: GRPOScale, split: str, n: int) -> Dataset:
    """``{"prompt", "reference"}``: the first ``n`` stdlib functions of ``split`` (seeded order) whose prompt and
    real body fit the token limits and whose prompt + real body parses; each prompt ends with ``indent_prime``."""

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def keep(row: dict[str, str]) -> bool:
        return (
            tokens(row["prompt"]) <= scale.max_prompt_tokens
            and tokens(row["completion"]) <= scale.max_reference_tokens
            and body_parses(row["prompt"], row["completion"])
        )

    rows = stdlib_sft_dataset(split, n=n, seed=scale.seed, keep=keep)
    primed = rows.map(lambda row: {"prompt": row["prompt"] + scale.indent_prime})
    return primed.rename_column("completion", "reference")


class PromptCache:
    """The train and held-out prompts of one scale, built once per process."""

    def __init__(self, scale: GRPOScale) -> None:
        self.scale = scale
        self._data: dict[str, Dataset] = {}

    def get(self, split: str) -> Dataset:
        if split not in self._data:
            n = self.scale.train_prompts if split == "train" else self.scale.eval_prompts
            self._data[split] = code_prompts(load_tokenizer(self.scale), self.scale, split, n)  # type: ignore[arg-type]
        return self._data[split]


# ------------------------------------------------------------------------------------ measurement
def k3_kl(logps_other: torch.Tensor, logps_policy: torch.Tensor, mask: torch.Tensor) -> float:
    """TRL's per-token KL estimator exp(Δ) − Δ − 1, Δ = log π_other − log π, averaged over the masked tokens."""
    delta = logps_other - logps_policy
    per_token = torch.exp(delta) - delta - 1
    return float((per_token * mask).sum() / mask.sum().clamp(min=1))


class InitialKLProbe:
    """At each training generation batch, after TRL scored it: the KL of the policy to the initial model (the base
    with adapters disabled; a fresh LoRA adapter starts at B = 0) and to the reference TRL used, on the sampled
    completions. No-grad forwards with dropout off: the training run itself does not change."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.values: list[list[float]] = []  # [step, KL to initial, KL to the own reference]
        original = trainer._generate_and_score_completions

        def generate_and_score(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if trainer.model.training:
                self.measure(output)
            return output

        trainer._generate_and_score_completions = generate_and_score

    @torch.no_grad()
    def measure(self, output: dict[str, Any]) -> None:
        from trl.trainer.utils import use_adapter

        trainer = self.trainer
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)

        def logps() -> torch.Tensor:
            values, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, ids.size(0))
            return values

        policy = logps()
        with use_adapter(trainer.accelerator.unwrap_model(trainer.model), adapter_name=None):
            initial = logps()
        completion = output["completion_mask"].float()
        reference = output.get("ref_per_token_logps")
        own = k3_kl(reference, policy, completion) if reference is not None else float("nan")
        self.values.append([trainer.state.global_step, k3_kl(initial, policy, completion), own])


def log_curves(log_history: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """``{key: [[step, value], ...]}`` of TRL's per-step training logs (evaluation entries left out)."""
    curves: dict[str, list[list[float]]] = {}
    for entry in log_history:
        if "eval_reward" in entry or "train_runtime" in entry:
            continue
        for key in LOGGED:
            if key in entry:
                curves.setdefault(key, []).append([int(entry["step"]), float(entry[key])])
    return curves


# ------------------------------------------------------------------------------------------- run
@dataclass
class GRPORun:
    """One run: ``steps`` optimizer steps (0: evaluate the initial model only) with the variant's callbacks."""

    scale: GRPOScale
    steps: int
    output_dir: Path
    reference: dict[str, Any] | None = None  # AveragedReferenceCallback fields; None = TRL's fixed reference
    distillation: dict[str, Any] | None = None  # SelfDistillationCallback fields (+ a BEMA WeightAveragingCallback)
    evaluate: bool = True


def variant_callbacks(run: GRPORun) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = []
    if run.reference is not None:
        callbacks.append(AveragedReferenceCallback(**run.reference))
    if run.distillation is not None:
        callbacks.append(WeightAveragingCallback(method="bema", update_every=1, eval=False))
        callbacks.append(SelfDistillationCallback(**run.distillation))
    return callbacks


def run_grpo(run: GRPORun, train: Dataset, held_out: Dataset, progress: Any = None) -> dict[str, Any]:
    """Train (unless ``run.steps == 0``), then evaluate on ``held_out``; return curves, KL probe, timings, eval."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    scale = run.scale
    model, tokenizer = load_model(scale)  # type: ignore[arg-type]
    args = GRPOConfig(
        output_dir=str(run.output_dir), max_steps=max(run.steps, 1), per_device_train_batch_size=scale.completions,
        per_device_eval_batch_size=scale.completions, num_generations=scale.completions,
        max_completion_length=scale.max_completion_length, learning_rate=scale.learning_rate, beta=scale.beta,
        seed=scale.seed, logging_steps=1, save_strategy="no", eval_strategy="no", use_cpu=True, bf16=False,
        fp16=False, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callbacks = variant_callbacks(run)
    step_probe = StepProbe(progress)
    set_seed(scale.seed)  # the LoRA A matrices are drawn inside the trainer: the same for every variant
    trainer = GRPOTrainer(
        model=model, reward_funcs=list(REWARD_FUNCTIONS), args=args, train_dataset=train, eval_dataset=held_out,
        processing_class=tokenizer, callbacks=[*callbacks, step_probe],
        peft_config=LoraConfig(
            r=scale.lora_r, lora_alpha=scale.lora_alpha, target_modules="all-linear", lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )  # fmt: skip
    if callbacks:
        attach(trainer)
    kl_probe = InitialKLProbe(trainer)
    start = time.perf_counter()
    if run.steps > 0:
        trainer.train()
    wall = time.perf_counter() - start
    evaluation = {k: float(v) for k, v in trainer.evaluate().items()} if run.evaluate else {}
    return {
        "kind": "grpo",
        "curves": log_curves(trainer.state.log_history) if run.steps > 0 else {},
        "kl_probe": kl_probe.values,
        "evaluation": evaluation,
        "step_seconds": step_probe.step_seconds,
        "median_step_seconds": median_seconds(step_probe.step_seconds),
        "cpu_step_seconds": step_probe.cpu_seconds,
        "median_cpu_step_seconds": median_seconds(step_probe.cpu_seconds),
        "wall_seconds": wall,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
