"""``WeightAveragingCallback``: averages the trainable weights of a transformers/TRL trainer.

The callback holds no math: it builds one :class:`~trl_ema_plugin.shadow.AveragedWeights`
per averager spec and calls it at the trainer's events.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...config import AveragerSpec, WeightAveragingConfig
from ...export import write_averaged_weights
from ...persistence import atomic_directory, averager_folder, read_state, write_state
from ...shadow import AveragedWeights, trainable_parameters
from ..parallel import build_layout, is_writer, zero_stage
from .checkpoint_adapters import drop_adapters, restore_policy_adapter
from .evaluation import averaged_prefix, eval_prefix, evaluate_with_trainer, mean_eval_loss
from .resume import checkpoint_folder, find_resume_checkpoint

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters train: strips DDP / DeepSpeed engine wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class WeightAveragingCallback(TrainerCallback):
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

    def __init__(
        self,
        method: str | None = None,
        *,
        config: WeightAveragingConfig | None = None,
        averagers: list[AveragerSpec | dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if config is not None and (method is not None or averagers is not None or kwargs):
            raise ValueError("pass either config=WeightAveragingConfig(...) or its fields, not both")
        self.config = config or WeightAveragingConfig.from_kwargs(method=method, averagers=averagers, **kwargs)
        self.weights: dict[str, AveragedWeights] = {}
        self.model: nn.Module | None = None
        self.trainer: Any = None  # set by attach()
        self.resume_from_checkpoint: str | bool | None = None  # set by attach()
        self._evaluating = False

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
        named = trainable_parameters(self.model)
        layout = build_layout(named, args)
        device = torch.device("cpu") if self.config.offload else None
        # the trainer loads the best checkpoint before on_train_end: the export must not read those weights as θ_T
        moves = bool(getattr(args, "load_best_model_at_end", False))
        self.weights = {spec.label: AveragedWeights(spec, layout, device, moves) for spec in self.config.averagers}

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        **kwargs: Any,
    ) -> None:
        self.setup(model, args)
        self._step = state.global_step
        self._check_evaluation_path(args)
        self._warn_if_never_updated(state.max_steps)
        resume = find_resume_checkpoint(self.resume_from_checkpoint, args, state.global_step)
        if resume is not None:
            self._repair_resumed_adapters(resume, args)
            self.load(resume, state.global_step)
        for weights in self.weights.values():
            weights.step(state.global_step)

    def _repair_resumed_adapters(self, checkpoint: str, args: TrainingArguments) -> None:
        """Drop the ``averaged*`` adapters transformers loaded from our folders; restore the policy adapter."""
        if zero_stage(args) is not None:
            return  # DeepSpeed resumes from its own files, not from adapter sub-folders
        folders = [averager_folder(name, primary=i == 0) for i, name in enumerate(self.weights)]
        drop_adapters(self.model, folders)
        restore_policy_adapter(self.model, checkpoint, getattr(self.model, "active_adapter", "default"))

    def _check_evaluation_path(self, args: TrainingArguments) -> None:
        """Preference trainers have no labels for the loss-only pass: they need ``attach(trainer)``."""
        from trl import DPOConfig

        strategy = getattr(args, "eval_strategy", "no")
        evaluates = getattr(strategy, "value", strategy) != "no"
        if self.config.eval and evaluates and self.trainer is None and isinstance(args, DPOConfig):
            raise ValueError(
                "evaluating averaged weights in a DPO run needs the trainer: call trl_ema_plugin.attach(trainer) "
                "before trainer.train(), or pass eval=False to WeightAveragingCallback"
            )

    def _warn_if_never_updated(self, max_steps: int) -> None:
        for spec in self.config.averagers:
            if max_steps > 0 and spec.first_update_step() > max_steps:
                message = (
                    f"averager {spec.label!r} will never update: it starts at step update_after={spec.update_after} "
                    f"and updates every update_every={spec.cadence} steps, but training stops at step {max_steps}; "
                    f"its output stays the weights of step {spec.update_after}. Lower update_every (alias update_freq)."
                )
                warnings.warn(message, UserWarning, stacklevel=2)
                logger.warning(message)

    # ----------------------------------------------------------------- steps
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step = state.global_step
        for weights in self.weights.values():
            weights.step(state.global_step)

    # ------------------------------------------------------------ evaluation
    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.config.eval or self._evaluating or not self.weights or metrics is None:
            return
        self._evaluating = True
        try:
            prefix = eval_prefix(metrics)
            for name, weights in self.weights.items():
                new = self._evaluate_one(weights, averaged_prefix(prefix, name), kwargs.get("eval_dataloader"), state)
                metrics.update(new)
        finally:
            self._evaluating = False

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
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.config.save_checkpoints and self.weights:
            self.save(checkpoint_folder(args, state.global_step), state.global_step, is_writer(state))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.config.export_at_end and self.weights:
            self.save(args.output_dir, state.global_step, is_writer(state))

    def save(self, parent: str | os.PathLike[str], global_step: int, writer: bool = True) -> None:
        """Write every averager's folder under ``parent``. Collective: call on every rank; ``writer`` writes."""
        for index, (name, weights) in enumerate(self.weights.items()):
            averaged = weights.averaged_tensors(global_step)
            state_tensors = weights.state_tensors()
            if not writer:
                continue
            with atomic_directory(Path(parent) / averager_folder(name, primary=index == 0)) as folder:
                write_averaged_weights(self.model, averaged, folder)
                write_state(folder, state_tensors, weights.state_metadata(), global_step)

    def load(self, checkpoint: str | os.PathLike[str], global_step: int | None = None) -> None:
        """Restore every averager from ``checkpoint`` (on every rank; any world size), saved at ``global_step``."""
        for index, (name, weights) in enumerate(self.weights.items()):
            folder = Path(checkpoint) / averager_folder(name, primary=index == 0)
            if not folder.is_dir():
                message = (
                    f"resuming from {checkpoint}, which holds no {folder.name}/ for averager {name!r}; "
                    "it starts again from the current weights"
                )
                warnings.warn(message, UserWarning, stacklevel=2)
                logger.warning(message)
                continue
            tensors, metadata = read_state(folder, global_step)
            weights.load_state(tensors, metadata)

    def attach_to(self, trainer: Any) -> None:
        """Called by :func:`trl_ema_plugin.attach`: full ``trainer.evaluate`` metrics, any-path resume."""
        self.trainer = trainer
