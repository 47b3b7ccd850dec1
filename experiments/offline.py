"""Average a recorded trajectory offline with the package's own code, and evaluate the result.

:func:`replay` feeds θ_0, θ_1, ..., θ_T of a :class:`~experiments.trajectory.Trajectory` through one
:class:`trl_ema_plugin.AveragedWeights` per averager setting, with the same cadence calls
(``step(t)`` at t = 0 and after every optimizer step) as ``WeightAveragingCallback``; so the
averaged tensors are those the callback would hold online (``tests/test_experiments.py`` checks
that they are bit-identical).

:class:`CompletionLoss` is the held-out loss on completion tokens: rows tokenized and collated by
TRL's own ``SFTTrainer`` (prompt tokens masked with -100), batched by length to cut padding. It
keeps each row's summed negative log-likelihood and token count, so both the per-token mean
(``loss``, the headline number) and the per-row mean can be computed from the cache.

:class:`ResultCache` stores each (setting, step) result of one run and eval sample in a JSON file,
written atomically after every evaluation, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trl_ema_plugin import AveragedWeights, AveragerSpec
from trl_ema_plugin.shadow import LocalLayout

from .runner import Scale, load_model, sft_data, with_lora
from .trajectory import Trajectory

RAW = "raw"  # the setting "no averaging": θ_t itself


def spec_of(name: str, settings: Mapping[str, Any]) -> AveragerSpec:
    """The validated ``AveragerSpec`` of one setting (``{"method": ..., ...}``), labelled ``name``."""
    return AveragerSpec(**{**settings, "name": name})


@torch.no_grad()
def replay(
    trajectory: Trajectory, settings: Mapping[str, Mapping[str, Any]], wanted: Mapping[str, set[int]]
) -> Iterator[tuple[int, str, dict[str, torch.Tensor]]]:
    """Yield ``(step, name, averaged tensors)`` for every step in ``wanted[name]``, in step order.

    One ``AveragedWeights`` per setting, all reading one set of carrier tensors that hold θ_t;
    ``step(t)`` is called at t = 0, 1, ..., max wanted step, as the callback does at
    ``on_train_begin`` and each ``on_step_end``. ``raw`` (θ_t itself) may appear in ``wanted``.
    """
    last = max((max(s) for s in wanted.values() if s), default=-1)
    if last > trajectory.steps:
        raise ValueError(f"step {last} asked for, but {trajectory.run_id} has {trajectory.steps} steps")
    first = trajectory.theta(0)
    carrier = [(name, nn.Parameter(first[name].clone(), requires_grad=False)) for name in trajectory.names]
    layout = LocalLayout(carrier)
    averages = {name: AveragedWeights(spec_of(name, s), layout, "cpu") for name, s in settings.items() if name != RAW}
    for t in range(last + 1):
        theta = first if t == 0 else trajectory.theta(t)
        torch._foreach_copy_([p for _, p in carrier], [theta[name] for name, _ in carrier])
        for weights in averages.values():
            weights.step(t)
        for name in wanted:
            if t not in wanted[name]:
                continue
            if name == RAW:
                yield t, name, {n: p.detach().clone() for n, p in carrier}
            else:
                yield t, name, averages[name].averaged_tensors(t)


class CompletionLoss:
    """Eval loss on completion tokens of ``rows``, for any adapter tensors loaded into ``model``."""

    def __init__(self, model: nn.Module, tokenizer: Any, rows: Any, scale: Scale, batch_size: int = 8) -> None:
        from trl import SFTConfig, SFTTrainer

        self.model = model
        self.params = dict(model.named_parameters())
        with tempfile.TemporaryDirectory() as work:
            args = SFTConfig(
                output_dir=work, max_length=scale.max_length, per_device_eval_batch_size=batch_size, use_cpu=True,
                report_to=[], disable_tqdm=True, save_strategy="no", bf16=False, fp16=False,
            )  # fmt: skip
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer
            )
            processed = [dict(row) for row in trainer.eval_dataset]
            collate = trainer.data_collator
        if len(processed) != len(rows):
            raise ValueError(f"TRL dropped {len(rows) - len(processed)} of {len(rows)} eval rows; pick rows that fit")
        order = sorted(range(len(processed)), key=lambda i: len(processed[i]["input_ids"]))
        self.order = order
        self.batches = [
            collate([{k: processed[i][k] for k in ("input_ids", "labels")} for i in order[lo : lo + batch_size]])
            for lo in range(0, len(order), batch_size)
        ]

    @torch.no_grad()
    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy adapter tensors (by parameter name) into the model."""
        missing = sorted(set(tensors) - set(self.params))
        if missing:
            raise ValueError(f"the eval model has no parameter(s) {missing[:3]}")
        for name, tensor in tensors.items():
            self.params[name].copy_(tensor)

    @torch.no_grad()
    def __call__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """``{"loss": Σ NLL / Σ tokens, "row_nll": [...], "row_tokens": [...]}`` (rows in dataset order)."""
        if tensors is not None:
            self.load(tensors)
        was_training = self.model.training
        self.model.eval()
        nll: list[float] = []
        counts: list[int] = []
        try:
            for batch in self.batches:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
                )
                mask = labels != -100
                nll += (losses * mask).sum(dim=1).tolist()
                counts += mask.sum(dim=1).tolist()
        finally:
            self.model.train(was_training)
        row_nll = [0.0] * len(nll)
        row_tokens = [0] * len(nll)
        for position, index in enumerate(self.order):
            row_nll[index], row_tokens[index] = nll[position], counts[position]
        return {"loss": sum(row_nll) / sum(row_tokens), "row_nll": row_nll, "row_tokens": row_tokens}


def eval_model(scale: Scale, seed: int, n_eval: int) -> tuple[nn.Module, CompletionLoss]:
    """The PeftModel of ``scale`` and the loss on ``n_eval`` held-out functions picked by ``seed``."""
    base, tokenizer = load_model(scale, seed)
    model = with_lora(base, scale, seed)
    rows = sft_data(tokenizer, scale, "eval", n_eval, seed=seed)
    return model, CompletionLoss(model, tokenizer, rows, scale, scale.eval_batch_size)


class ResultCache:
    """``{"<setting>@<step>": result}`` of one run and eval sample, in one JSON file, with each setting's spec."""

    def __init__(self, path: str | os.PathLike[str], context: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.context = dict(context)
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data["context"] != self.context:
                raise ValueError(f"{self.path} holds results of another context: {data['context']} != {self.context}")
            self.settings: dict[str, Any] = data["settings"]
            self.results: dict[str, Any] = data["results"]
        else:
            self.settings, self.results = {}, {}

    @staticmethod
    def key(name: str, step: int) -> str:
        return f"{name}@{step}"

    def register(self, name: str, settings: Mapping[str, Any]) -> None:
        """Remember a setting's spec; a name that meant other settings before is an error."""
        spec = dict(settings)
        if name in self.settings and self.settings[name] != spec:
            raise ValueError(f"setting {name!r} in {self.path} was {self.settings[name]}, now {spec}: rename it")
        self.settings[name] = spec

    def get(self, name: str, step: int) -> dict[str, Any] | None:
        return self.results.get(self.key(name, step))

    def put(self, name: str, step: int, result: Mapping[str, Any]) -> None:
        self.results[self.key(name, step)] = dict(result)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        body = {"context": self.context, "settings": self.settings, "results": self.results}
        tmp.write_text(json.dumps(body, indent=0))
        os.replace(tmp, self.path)


def evaluate_run(
    trajectory: Trajectory,
    settings: Mapping[str, Mapping[str, Any]],
    steps: Mapping[str, set[int]],
    cache: ResultCache,
    loss: CompletionLoss,
    progress: Any = None,
) -> int:
    """Evaluate every (setting, step) that ``cache`` lacks; return how many were computed.

    At step 0 every average equals θ_0, so only ``raw@0`` is evaluated and reused for the others.
    """
    for name, spec in settings.items():
        cache.register(name, spec)
    todo: dict[str, set[int]] = {}
    for name, wanted in steps.items():
        missing = {t for t in wanted if cache.get(name, t) is None and not (t == 0 and name != RAW)}
        if missing:
            todo[name] = missing
    if any(0 in s for s in steps.values()) and cache.get(RAW, 0) is None:
        todo.setdefault(RAW, set()).add(0)
    computed = 0
    same_step: list[tuple[str, dict[str, torch.Tensor], dict[str, Any]]] = []  # evaluated at step `current`
    current = -1
    for step, name, tensors in replay(trajectory, settings, todo):
        if step != current:
            same_step, current = [], step
        twin = next((n for n, t, _ in same_step if all(torch.equal(t[k], tensors[k]) for k in tensors)), None)
        if twin is not None:  # e.g. a β floor that never binds in a short run: the same weights, the same loss
            result = {**cache.get(twin, step), "setting": name, "same_weights_as": twin}
        else:
            started = time.process_time()
            result = {**loss(tensors), "step": step, "setting": name, "cpu_seconds": time.process_time() - started}
            computed += 1
        cache.put(name, step, result)
        if twin is None:
            same_step.append((name, tensors, result))
        if progress is not None:
            progress.update(1)
    return computed


def curve(cache: ResultCache, name: str, steps: list[int]) -> list[tuple[int, float]]:
    """``[(step, loss)]`` of one setting; step 0 is ``raw@0`` for every setting."""
    points = []
    for t in steps:
        result = cache.get(RAW if t == 0 else name, t)
        if result is not None:
            points.append((t, result["loss"]))
    return points
