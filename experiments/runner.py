"""One training run of the evidence studies: SFT or DPO, a LoRA adapter, measured step by step.

A run builds the model (SmolLM2-135M-Instruct, or the tiny Llama for smoke runs), wraps it in
LoRA, trains with TRL's ``SFTTrainer`` / ``DPOTrainer`` plus the plugin's callbacks, and returns
a JSON-able dict: eval curves (``[[step, value], ...]``), train losses, per-step seconds and,
for weight averaging, the seconds and memory of each averager.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed

from trl_ema_plugin.integrations.trl import WeightAveragingCallback, attach

from .stdlib_data import stdlib_dpo_dataset, stdlib_sft_dataset

MODELS = ("smollm2", "tiny")


@dataclass(frozen=True)
class Scale:
    """Sizes of a study run. ``full`` is the documented run; ``smoke`` and ``tiny`` only check that it works."""

    name: str
    model: str = "smollm2"
    max_length: int = 128
    batch_size: int = 4
    eval_batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    seeds: tuple[int, ...] = (0, 1)
    n_eval: int = 24
    # (a) SFT
    sft_steps: int = 60
    sft_train: int = 1024
    sft_eval_every: int = 12
    # (b) low data
    lowdata_train: int = 64
    lowdata_steps: int = 48
    lowdata_eval_every: int = 12
    # (c) DPO
    dpo_steps: int = 24
    dpo_train: int = 128
    dpo_eval: int = 16
    dpo_eval_every: int = 8
    dpo_learning_rate: float = 1e-4
    dpo_beta: float = 0.1

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}; allowed values: {', '.join(MODELS)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Scale] = {
    "full": Scale("full"),
    "smoke": Scale(
        "smoke", seeds=(0,), n_eval=8, sft_steps=2, sft_train=32, sft_eval_every=1, lowdata_train=8, lowdata_steps=2,
        lowdata_eval_every=1, dpo_steps=2, dpo_train=8, dpo_eval=8, dpo_eval_every=1,
    ),
    "tiny": Scale(
        "tiny", model="tiny", max_length=256, lora_r=4, lora_alpha=8, learning_rate=5e-3, seeds=(0,), n_eval=8,
        sft_steps=4, sft_train=32, sft_eval_every=2, lowdata_train=8, lowdata_steps=4, lowdata_eval_every=2,
        dpo_steps=4, dpo_train=8, dpo_eval=8, dpo_eval_every=2, dpo_learning_rate=5e-3,
    ),
}  # fmt: skip


def scale_named(name: str) -> Scale:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"scale={name!r}; allowed values: {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------------ model and data
def load_model(scale: Scale, seed: int = 0):
    """``(model, tokenizer)`` for ``scale.model``: the pretrained SmolLM2 copy, or a tiny random Llama."""
    if scale.model == "tiny":
        from trl_ema_plugin.demos.tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer, seed=seed), tokenizer
    from .smollm2 import load_smollm2

    return load_smollm2()


def load_tokenizer(scale: Scale):
    """The tokenizer of ``scale.model`` alone (no weights loaded)."""
    if scale.model == "tiny":
        from trl_ema_plugin.demos.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    from .smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def with_lora(model: torch.nn.Module, scale: Scale, seed: int):
    """``get_peft_model`` with the scale's LoRA (dropout 0, so the averages are the only smoothing)."""
    from peft import LoraConfig, get_peft_model

    set_seed(seed)  # LoRA's A matrices are drawn here
    config = LoraConfig(
        r=scale.lora_r, lora_alpha=scale.lora_alpha, target_modules=list(scale.target_modules), lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + eos


def sft_data(tokenizer: Any, scale: Scale, split: str, n: int, seed: int = 0) -> Dataset:
    """``n`` prompt-completion rows of ``split`` that fit ``scale.max_length`` tokens (never truncated)."""

    def fits(row: dict[str, str]) -> bool:
        return _token_count(tokenizer, row["prompt"] + row["completion"]) <= scale.max_length

    return stdlib_sft_dataset(split, n=n, seed=seed, keep=fits)


def dpo_data(tokenizer: Any, scale: Scale, split: str, n: int, seed: int = 0) -> Dataset:
    """``n`` DPO pairs of ``split`` whose prompt + chosen and prompt + rejected both fit ``scale.max_length``."""

    def fits(row: dict[str, str]) -> bool:
        return max(_token_count(tokenizer, row["prompt"] + row[k]) for k in ("chosen", "rejected")) <= scale.max_length

    return stdlib_dpo_dataset(split, n=n, seed=seed, keep=fits)


# ------------------------------------------------------------------------------ measurement
class StepProbe(TrainerCallback):
    """Put it last in ``callbacks``: times each optimizer step (including the other callbacks'
    ``on_step_end``, excluding evaluation), ticks a progress bar, and runs ``evaluate(step)`` at
    step 0 and every ``eval_every`` steps when given.

    It records wall seconds and this process's CPU seconds per step. With one torch thread the CPU
    seconds measure the work of a step even while other jobs share the cores; wall seconds do not.
    """

    def __init__(
        self, progress: Any = None, evaluate: Callable[[int], dict[str, float]] | None = None, eval_every: int = 0
    ) -> None:
        self.progress = progress
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.step_seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._cpu_start = 0.0
        self.evaluations: list[tuple[int, dict[str, float]]] = []
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluate is not None:
            self.evaluations.append((state.global_step, self.evaluate(state.global_step)))

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        if self.progress is not None:
            self.progress.update(1)
        due = self.eval_every and (state.global_step % self.eval_every == 0 or state.global_step >= state.max_steps)
        if self.evaluate is not None and due:
            self.evaluations.append((state.global_step, self.evaluate(state.global_step)))


class TimedWeightAveraging(WeightAveragingCallback):
    """``WeightAveragingCallback`` that also records the seconds of each averager's per-step update.

    It steps the averagers one at a time, to time each (the callback itself reads θ once for all of them); the
    averages are the same bit for bit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.update_seconds: dict[str, list[float]] = defaultdict(list)

    def on_step_end(self, args, state, control, **kwargs):
        self._step = state.global_step
        for name, weights in self.weights.items():
            start = time.perf_counter()
            weights.step(state.global_step)
            weights.wait()
            self.update_seconds[name].append(time.perf_counter() - start)


def median_seconds(seconds: list[float]) -> float:
    """Median step time, leaving out the first step (allocator and thread-pool warm-up)."""
    usable = seconds[1:] if len(seconds) > 2 else seconds
    return statistics.median(usable) if usable else math.nan


def eval_curves(log_history: list[dict[str, Any]], names: list[str]) -> dict[str, list[list[float]]]:
    """``{"raw": [[step, eval_loss], ...], name: [[step, eval_<name>_loss], ...]}`` from the trainer's log."""
    curves: dict[str, dict[int, float]] = {"raw": {}, **{n: {} for n in names}}
    for entry in log_history:
        step = int(entry.get("step", 0))
        if "eval_loss" in entry:
            curves["raw"][step] = float(entry["eval_loss"])
        for name in names:
            key = f"eval_{name}_loss"
            if key in entry:
                curves[name][step] = float(entry[key])
    return {k: [[s, v] for s, v in sorted(c.items())] for k, c in curves.items()}


def train_losses(log_history: list[dict[str, Any]]) -> list[list[float]]:
    return [[int(e["step"]), float(e["loss"])] for e in log_history if "loss" in e and "eval_loss" not in e]


# ------------------------------------------------------------------------------ SFT
@dataclass
class SFTRun:
    """One SFT run: LoRA on ``train``, evaluated on ``eval`` every ``eval_every`` steps (0: never, a timing run)."""

    scale: Scale
    seed: int
    steps: int
    eval_every: int
    output_dir: Path
    averagers: list[dict[str, Any]] = field(default_factory=list)
    distillation: dict[str, Any] | None = None  # SelfDistillationCallback fields; needs averagers


def run_sft(run: SFTRun, train: Dataset, eval_set: Dataset, progress: Any = None) -> dict[str, Any]:
    """Train, then return the eval curves of the raw weights and of every averager."""
    from trl import SFTConfig, SFTTrainer

    scale = run.scale
    evaluate = run.eval_every > 0
    base, tokenizer = load_model(scale, run.seed)
    model = with_lora(base, scale, run.seed)
    args = SFTConfig(
        output_dir=str(run.output_dir), max_steps=run.steps, per_device_train_batch_size=scale.batch_size,
        per_device_eval_batch_size=scale.eval_batch_size, learning_rate=scale.learning_rate, seed=run.seed,
        max_length=scale.max_length, eval_strategy="steps" if evaluate else "no", eval_steps=run.eval_every or None,
        logging_steps=max(1, run.eval_every // 2),
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        prediction_loss_only=True,  # the eval loss is all we read
    )  # fmt: skip
    averaging = TimedWeightAveraging(averagers=run.averagers, eval=evaluate) if run.averagers else None
    callbacks: list[TrainerCallback] = [averaging] if averaging else []
    if run.distillation is not None:
        from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback

        if averaging is None:
            raise ValueError("a distillation run needs averagers (its teacher)")
        callbacks.append(SelfDistillationCallback(**run.distillation))
    probe = StepProbe(progress)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=eval_set if evaluate else None,
        processing_class=tokenizer, callbacks=[*callbacks, probe],
    )  # fmt: skip
    if callbacks:
        attach(trainer)
    start = time.perf_counter()
    initial = trainer.evaluate()["eval_loss"] if evaluate else None  # step 0: every average equals θ_0
    trainer.train()
    wall = time.perf_counter() - start
    names = list(averaging.weights) if averaging else []
    curves = eval_curves(trainer.state.log_history, names) if evaluate else {}
    for curve in curves.values():
        curve.insert(0, [0, float(initial)])
    result: dict[str, Any] = {
        "kind": "sft",
        "curves": curves,
        "train_loss": train_losses(trainer.state.log_history),
        "step_seconds": probe.step_seconds,
        "median_step_seconds": median_seconds(probe.step_seconds),
        "cpu_step_seconds": probe.cpu_seconds,
        "median_cpu_step_seconds": median_seconds(probe.cpu_seconds),
        "wall_seconds": wall,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if averaging is not None:
        result["update_seconds"] = {n: statistics.mean(s[1:] or s) for n, s in averaging.update_seconds.items()}
        result["shadow_mib"] = {n: w.memory_bytes() / 2**20 for n, w in averaging.weights.items()}
    if run.distillation is not None:
        result["teacher_forwards"] = callbacks[-1].teacher_forwards
    return result


# ------------------------------------------------------------------------------ DPO
@torch.no_grad()
def completion_logps(
    model: Any, tokenizer: Any, prompts: list[str], completions: list[str], batch_size: int
) -> torch.Tensor:
    """Σ log p(completion + eos | prompt) per row, tokenized as TRL's DPOTrainer does (non-conversational)."""
    eos = tokenizer.eos_token or ""
    sequences, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + completion + eos, add_special_tokens=False)["input_ids"]
        common = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), min(len(prompt_ids), len(ids))
        )
        sequences.append(ids)
        starts.append(common)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(sequences), batch_size):
            chunk = sequences[lo : lo + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            for row, seq in enumerate(chunk):
                start = max(starts[lo + row], 1)
                out.append(logps[row, start - 1 : len(seq) - 1].sum().cpu())
    finally:
        model.train(was_training)
    return torch.stack(out)


class PreferenceProbe:
    """Eval reward accuracy and margin of a DPO policy, against its current reference and the initial model.

    reward(y) = β · (log π(y|x) − log π_ref(y|x)); margin = reward(chosen) − reward(rejected),
    accuracy = mean(margin > 0). "vs ref" uses the trainer's reference (the ``"ref"`` adapter, which
    moves with an averaged reference); "vs initial" uses the model before training, for all methods.
    """

    def __init__(self, model: Any, tokenizer: Any, pairs: Dataset, beta: float, batch_size: int) -> None:
        from trl.trainer.utils import use_adapter

        self.model, self.tokenizer, self.beta, self.batch_size = model, tokenizer, beta, batch_size
        self.use_adapter = use_adapter
        self.prompts = list(pairs["prompt"])
        self.chosen, self.rejected = list(pairs["chosen"]), list(pairs["rejected"])
        with use_adapter(model, "ref"):
            self.initial = self._delta()  # before training "ref" == "default"

    def _delta(self) -> torch.Tensor:
        logps = [
            completion_logps(self.model, self.tokenizer, self.prompts, c, self.batch_size)
            for c in (self.chosen, self.rejected)
        ]
        return logps[0] - logps[1]

    def __call__(self, step: int) -> dict[str, float]:
        policy = self._delta()
        with self.use_adapter(self.model, "ref"):
            reference = self._delta()
        metrics = {}
        for label, ref in (("ref", reference), ("initial", self.initial)):
            margin = self.beta * (policy - ref)
            metrics[f"accuracy_vs_{label}"] = float((margin > 0).float().mean())
            metrics[f"margin_vs_{label}"] = float(margin.mean())
        metrics["policy_logp_gap"] = float(policy.mean())
        return metrics


@dataclass
class DPORun:
    scale: Scale
    seed: int
    steps: int
    eval_every: int
    output_dir: Path
    reference: dict[str, Any] | None = None  # AveragedReferenceCallback fields; None = TRL's fixed reference


def run_dpo(run: DPORun, train: Dataset, eval_pairs: Dataset, progress: Any = None) -> dict[str, Any]:
    """DPO with LoRA; the reference is TRL's ``"ref"`` adapter, fixed or kept averaged by the plugin."""
    from trl import DPOConfig, DPOTrainer

    scale = run.scale
    base, tokenizer = load_model(scale, run.seed)
    model = with_lora(base, scale, run.seed)
    args = DPOConfig(
        output_dir=str(run.output_dir), max_steps=run.steps, per_device_train_batch_size=scale.batch_size,
        learning_rate=scale.dpo_learning_rate, beta=scale.dpo_beta, seed=run.seed, max_length=scale.max_length,
        logging_steps=max(1, run.eval_every // 2), save_strategy="no", eval_strategy="no", use_cpu=True, bf16=False,
        fp16=False, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callbacks: list[TrainerCallback] = []
    if run.reference is not None:
        from trl_ema_plugin.integrations.trl.dpo_reference import AveragedReferenceCallback

        callbacks.append(AveragedReferenceCallback(**run.reference))
    probe = StepProbe(progress, eval_every=run.eval_every)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[*callbacks, probe]
    )
    if callbacks:
        attach(trainer)
    if run.eval_every > 0:
        probe.evaluate = PreferenceProbe(trainer.model, tokenizer, eval_pairs, scale.dpo_beta, scale.eval_batch_size)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for step, metrics in probe.evaluations:
        for key, value in metrics.items():
            curves[key].append([step, value])
    return {
        "kind": "dpo",
        "curves": dict(curves),
        "train_loss": train_losses(trainer.state.log_history),
        "step_seconds": probe.step_seconds,
        "median_step_seconds": median_seconds(probe.step_seconds),
        "cpu_step_seconds": probe.cpu_seconds,
        "median_cpu_step_seconds": median_seconds(probe.cpu_seconds),
        "wall_seconds": wall,
    }
