"""``WeightAveragingCallback``: averages the trainable weights of a transformers/TRL trainer.

The callback holds no math: it builds one :class:`~trl_ema_plugin.shadow.AveragedWeights`
per averager spec and calls it at the trainer's events.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from ...config import AveragerSpec, WeightAveragingConfig
from ...config.advice import ExtrapolationWarning, long_run_advice, never_updates
from ...distributed import is_writer
from ...model_files import write_averaged_weights
from ...model_helpers import unwrap_model
from ...persistence import averager_folder, write_state_folder
from ...shadow import AveragedWeights
from ...shadow.runner import UpdateRunner
from ...shadow.store import step_together
from ..parallel import trainable_shadow
from .evaluation import averaged_prefix, eval_prefix, evaluate_with_trainer, mean_eval_loss
from .lifecycle import PluginCallback
from .trainer_kinds import evaluates_without_labels, trainer_kind

#: log key prefix of the skipped-update counts: ``averaging/<name>/skipped_updates``
SKIPPED_PREFIX = "averaging"


class WeightAveragingCallback(PluginCallback):
    """Keep EMA/BEMA/DEMA/OUEMA averages of the trainable weights during ``trainer.train()``.

    One line: ``SFTTrainer(..., callbacks=[WeightAveragingCallback(method="bema")])``. It then

    * updates every averager after optimizer steps (never per micro-batch);
    * at each evaluation, evaluates each averager too, as ``eval_<name>_loss`` (a loss-only
      pass; after :func:`trl_ema_plugin.attach` every metric, through ``trainer.evaluate``);
    * writes ``checkpoint-N/averaged/`` (and ``averaged-<name>/``) with every checkpoint;
    * restores from it on ``resume_from_checkpoint=True`` or ``output_dir/checkpoint-N``;
    * exports ``output_dir/averaged/`` at the end of training.

    Arguments are those of :class:`~trl_ema_plugin.config.WeightAveragingConfig` and, for a single
    averager, of :class:`~trl_ema_plugin.config.AveragerSpec` (``method``, ``decay``, ``update_freq``...).
    """

    config_class = WeightAveragingConfig
    config: WeightAveragingConfig

    def __init__(
        self,
        method: str | None = None,
        *,
        config: WeightAveragingConfig | None = None,
        averagers: list[AveragerSpec | dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        given = {k: v for k, v in {"method": method, "averagers": averagers}.items() if v is not None}
        super().__init__(config, **given, **kwargs)
        self.weights: dict[str, AveragedWeights] = {}
        self.runner: UpdateRunner | None = None
        self._evaluating = False

    @classmethod
    def build_config(cls, **fields: Any) -> WeightAveragingConfig:
        """``method=..., decay=...`` or ``averagers=[...]``, and TRL ``BEMACallback``'s ``device``."""
        return WeightAveragingConfig.from_kwargs(**fields)

    # ------------------------------------------------------------------ API
    @property
    def primary(self) -> AveragedWeights:
        return self.weights[self.config.primary.label]

    def averaged_tensors(self, name: str | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """Full averaged tensors of averager ``name`` (default: the primary). Collective under ZeRO."""
        weights = self.weights[name] if name is not None else self.primary
        return weights.averaged_tensors(self._step if step is None else step)

    # ----------------------------------------------------------------- setup
    def setup(self, model: nn.Module, args: TrainingArguments) -> None:
        """Build the shadow stores for ``model`` (done by ``on_train_begin``)."""
        self.model = unwrap_model(model)
        layout, device, self.runner = trainable_shadow(self.model, args, self.config.offload)
        # the trainer loads the best checkpoint before on_train_end: the export must not read those weights as θ_T
        moves = bool(getattr(args, "load_best_model_at_end", False))
        self.weights = {
            spec.label: AveragedWeights(
                spec.for_run(self.run_max_steps), layout, device, moves, self.runner, self.config.on_nonfinite
            )
            for spec in self.config.averagers
        }

    def runners(self) -> list[UpdateRunner]:
        return [] if self.runner is None else [self.runner]

    def check_run(self, args: TrainingArguments, state: TrainerState) -> None:
        self._check_evaluation_path(args)
        self._warn_if_never_updated(state.max_steps)
        self._warn_if_extrapolating_a_long_run(state.max_steps)

    def start(self, global_step: int) -> None:
        self._step = global_step
        step_together(list(self.weights.values()), global_step)

    def checkpoint_folders(self) -> list[str]:
        """``averaged/`` for the primary averager, ``averaged-<name>/`` for each other one."""
        return [averager_folder(spec.label, primary=index == 0) for index, spec in enumerate(self.config.averagers)]

    def describe(self) -> str:
        return f"WeightAveragingCallback(averagers: {', '.join(spec.label for spec in self.config.averagers)})"

    def one_of_a_kind_hint(self) -> str:
        return (
            "Pass one WeightAveragingCallback(averagers=[{...}, {...}]) with every averager (names must differ); "
            "the first is the primary, written to averaged/, the others to averaged-<name>/."
        )

    def _check_evaluation_path(self, args: TrainingArguments) -> None:
        """Preference and RL trainers have no labels for the loss-only pass: they need ``attach(trainer)``."""
        strategy = getattr(args, "eval_strategy", "no")
        evaluates = getattr(strategy, "value", strategy) != "no"
        if self.config.eval and evaluates and self.trainer is None and evaluates_without_labels(args):
            raise ValueError(
                f"evaluating averaged weights in a {trainer_kind(args)} run needs the trainer: call "
                "trl_ema_plugin.attach(trainer) before trainer.train(), or pass eval=False to WeightAveragingCallback"
            )

    def _warn_if_never_updated(self, max_steps: int) -> None:
        for spec in self.config.averagers:
            reason = never_updates(spec, max_steps)
            if reason is not None:
                self.warn(
                    f"averager {spec.label!r} will never update: {reason}; its output stays the weights of step "
                    f"{spec.update_after}. Lower update_every (alias update_freq)."
                )

    def _warn_if_extrapolating_a_long_run(self, max_steps: int) -> None:
        for spec in self.config.averagers:
            advice = long_run_advice(spec, max_steps)
            if advice is not None:
                label = spec.label
                self.warn(
                    f"{advice}. Evaluate both (eval_loss and eval_{label}_loss; metric_for_best_model="
                    f"'eval_{label}_loss' selects checkpoints by the average) and keep the better. "
                    "warnings.filterwarnings('ignore', category=trl_ema_plugin.ExtrapolationWarning) silences this.",
                    ExtrapolationWarning,
                )

    # ----------------------------------------------------------------- steps
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step = state.global_step
        step_together(list(self.weights.values()), state.global_step)
        self.report_skips(list(self.weights.values()), SKIPPED_PREFIX, control)
        super().on_step_end(args, state, control, **kwargs)

    # ------------------------------------------------------------ evaluation
    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.config.eval and not self._evaluating and self.weights and metrics is not None:
            self._evaluating = True
            try:
                prefix = eval_prefix(metrics)
                for name, weights in self.weights.items():
                    dataloader = kwargs.get("eval_dataloader")
                    metrics.update(self._evaluate_one(weights, averaged_prefix(prefix, name), dataloader, state))
            finally:
                self._evaluating = False
        super().on_evaluate(args, state, control, metrics=metrics, **kwargs)

    def _evaluate_one(
        self, weights: AveragedWeights, prefix: str, dataloader: Any, state: TrainerState
    ) -> dict[str, float]:
        with weights.swapped_in(self._step):
            if self.trainer is not None:
                return evaluate_with_trainer(self.trainer, prefix, dataloader)
            if dataloader is None:
                raise ValueError("averaged evaluation got no eval_dataloader; call trl_ema_plugin.attach(trainer)")
            loss = mean_eval_loss(self.model, dataloader)
        new = {f"{prefix}_loss": loss}
        state.log_history.append({**new, "epoch": state.epoch, "step": state.global_step})
        return new

    # ---------------------------------------------------------------- saving
    def has_checkpoint_state(self) -> bool:
        return self.config.save_checkpoints and bool(self.weights)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.config.export_at_end and self.weights:
            self.save(args.output_dir, state.global_step, is_writer(state))
        self.close_runners()
        super().on_train_end(args, state, control, **kwargs)

    def save(self, parent: str | os.PathLike[str], global_step: int, writer: bool = True) -> None:
        """Write every averager's folder under ``parent``. Collective: call on every rank; ``writer`` writes."""
        for folder, weights in zip(self.checkpoint_folders(), self.weights.values(), strict=True):
            averaged = weights.averaged_tensors(global_step)
            state_tensors = weights.state_tensors()
            if writer:
                model_files = functools.partial(write_averaged_weights, self.model, averaged)
                write_state_folder(
                    Path(parent) / folder, state_tensors, weights.state_metadata(), global_step, model_files
                )

    def load(self, checkpoint: str | os.PathLike[str], global_step: int | None = None) -> None:
        """Restore every averager from ``checkpoint`` (on every rank; any world size), saved at ``global_step``."""
        for folder, (name, weights) in zip(self.checkpoint_folders(), self.weights.items(), strict=True):
            saved = self.read_checkpoint_state(
                checkpoint, folder, global_step, f" for averager {name!r}", "it starts again from the current weights"
            )
            if saved is not None:
                self.restore_averager(weights, *saved, checkpoint, folder)
