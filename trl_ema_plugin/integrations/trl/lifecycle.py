"""``PluginCallback``: the life cycle every trl_ema_plugin callback shares.

* **Construction**: from one validated config object (``config=``) or from its fields as keyword
  arguments, not both.
* **Attach**: :func:`trl_ema_plugin.attach` selects the callbacks of this type on a trainer, hands
  each the trainer (:meth:`~PluginCallback.attach_to`) and the ``resume_from_checkpoint`` argument of
  ``trainer.train``.
* **Train begin**, in this order: :meth:`~PluginCallback.check_run` (refuse or warn before anything is
  built), :meth:`~PluginCallback.setup` (the state for the model), :meth:`~PluginCallback.resume`,
  :meth:`~PluginCallback.start` (the first step, fresh or resumed).
* **Resume** (:meth:`~PluginCallback.resume`): the checkpoint the trainer resumed from; outside DeepSpeed and FSDP2,
  the adapters transformers loaded from our sub-folders are dropped and the policy adapter restored
  where it did not; then :meth:`~PluginCallback.load`. Every state file is verified against its checksum;
  a damaged one is an error naming it and the checkpoint to resume from instead. A checkpoint without
  our folder takes its staged copy (the run stopped between the trainer's save and ours); without one, it
  is an error naming the newest older checkpoint that holds the folder, or, when none does, a warning and
  the feature starts afresh (:meth:`~PluginCallback.read_checkpoint_state`).
* **Updates in flight**: an average may update on a side CUDA stream or in a worker thread
  (:meth:`~PluginCallback.runners`): ``on_pre_optimizer_step`` makes the optimizer wait for the update's
  reads of θ, ``on_epoch_end`` and every reader of the averages wait for the update itself.
* **Save**, crash-safe: once the trainer has decided to save (``control.should_save`` in ``on_step_end`` /
  ``on_epoch_end``; with ``save_strategy="best"`` at every evaluation), :meth:`~PluginCallback.save` writes
  our folders to ``<output_dir>/.trl_ema_plugin/staged/checkpoint-N/``, before the trainer writes
  ``checkpoint-N``; ``on_save`` renames them into it. Any other save writes them at ``on_save``. Collective:
  every rank calls :meth:`~PluginCallback.save` (the gathers are collective); global rank 0 writes, each
  folder atomically (:func:`~trl_ema_plugin.persistence.write_state_folder`), and removes what earlier,
  stopped saves left.
* **Warnings** reach both the user (``UserWarning``) and the run's log (:meth:`~PluginCallback.warn`);
  **metrics** go into the trainer's next log (:meth:`~PluginCallback.record_metric`).
* **One of a kind**: two callbacks that write the same checkpoint folder are refused before training
  (:meth:`~PluginCallback.conflict_with`).

A new feature names its ``config_class``, fills in the train-begin steps it needs and, if it keeps
state in checkpoints, ``checkpoint_folders``, ``has_checkpoint_state``, ``save`` and ``load``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...distributed import is_writer
from ...model_files import ADAPTER_WEIGHTS
from ...persistence import STATE_JSON, StateFileError, read_state
from ...scratch import copy_folder, remove_stale_scratch, replace_folder, staged_copy, staged_folder
from ...shadow import AveragedWeights
from ...shadow.runner import UpdateRunner
from ..parallel import engine_restores_model
from .checkpoint_adapters import drop_adapters, restore_policy_adapter
from .resume import checkpoint_folder, find_resume_checkpoint, newest_checkpoint_with, resume_advice

#: attribute of the run's ``TrainerState`` that lists the plugin callbacks that began training in it
_RUN_CALLBACKS = "_trl_ema_plugin_callbacks"


class PluginCallback(TrainerCallback):
    """Base of ``WeightAveragingCallback``, ``AveragedReferenceCallback`` and ``SelfDistillationCallback``."""

    #: the validated config this callback is built from
    config_class: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel | None = None, **fields: Any) -> None:
        name = self.config_class.__name__
        if config is not None and fields:
            raise ValueError(f"pass either config={name}(...) or its fields, not both")
        if config is not None and not isinstance(config, self.config_class):
            raise TypeError(f"config= takes a {name}, got {type(config).__name__}")
        self.config = config if config is not None else self.build_config(**fields)
        self.model: nn.Module | None = None  # the unwrapped model, set up at train begin
        self.trainer: Any = None  # set by attach()
        self.resume_from_checkpoint: str | bool | None = None  # set by attach()
        self._writer = True  # whether this process writes files (set at train begin)
        self._training = False
        self._staged_step: int | None = None  # the step whose state is staged, waiting for on_save
        self._state_sources: dict[str, Path] = {}  # folder → where resume read it
        self._own_metrics: dict[str, list[float]] = defaultdict(list)
        self._uneven_skips: set[str] = set()  # averagers whose ranks skipped different updates (warned once)
        self.run_max_steps = 0  # the trainer's max_steps, set at train begin (for bias_horizon="max_steps")

    @classmethod
    def build_config(cls, **fields: Any) -> Any:
        """The config from keyword arguments (a subclass may accept aliases here)."""
        return cls.config_class(**fields)

    def attach_to(self, trainer: Any) -> None:
        """Called by :func:`trl_ema_plugin.attach` with the trainer, before ``trainer.train()``."""
        self.trainer = trainer

    # ------------------------------------------------------------------ one of a kind
    def describe(self) -> str:
        """How messages name this callback."""
        return type(self).__name__

    def conflict_with(self, other: PluginCallback) -> str | None:
        """Why this callback and ``other`` cannot share a trainer (None when they can): both write a folder."""
        shared = sorted(set(self.checkpoint_folders()) & set(other.checkpoint_folders()))
        if not shared:
            return None
        return (
            f"{self.describe()} and {other.describe()} are on one trainer, and both write "
            f"{', '.join(f + '/' for f in shared)} (the second would overwrite the first). {self.one_of_a_kind_hint()}"
        )

    def one_of_a_kind_hint(self) -> str:
        """What to do instead of two such callbacks."""
        return f"Keep one {type(self).__name__}."

    def _check_alone(self, state: TrainerState) -> None:
        """Refuse, at train begin, a second callback of the run that writes our folders (no trainer needed)."""
        others: list[PluginCallback] = state.__dict__.setdefault(_RUN_CALLBACKS, [])
        for other in others:
            reason = other.conflict_with(self)
            if reason is not None:
                raise ValueError(reason)
        others.append(self)

    # --------------------------------------------------------------- train begin
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        **kwargs: Any,
    ) -> None:
        self._check_alone(state)
        self._writer = is_writer(state)
        self._training = True
        self._staged_step = None
        self.run_max_steps = state.max_steps
        self.check_run(args, state)
        self.setup(model, args)
        self.resume(args, state)
        self.start(state.global_step)

    def check_run(self, args: TrainingArguments, state: TrainerState) -> None:
        """Refuse (``ValueError``) or warn about settings this feature cannot honour, before anything is built."""

    def setup(self, model: nn.Module, args: TrainingArguments) -> None:
        """Build this callback's state for ``model`` (and set :attr:`model` to it, unwrapped)."""

    def start(self, global_step: int) -> None:
        """Take the run's first step, fresh or resumed, once the state is restored."""

    # -------------------------------------------------------------------- resume
    def checkpoint_folders(self) -> list[str]:
        """Sub-folders of ``checkpoint-N`` this callback writes."""
        return []

    def resume(self, args: TrainingArguments, state: TrainerState) -> str | None:
        """Restore this callback's state from the checkpoint the trainer resumed from; return that folder.

        Call from ``on_train_begin`` once :attr:`model` is set up. Outside DeepSpeed and FSDP2 (which resume
        from their own files), transformers loads every checkpoint sub-folder holding an adapter as an extra
        adapter, and 5.16 then skips the root adapter: both are undone first.
        """
        checkpoint = find_resume_checkpoint(self.resume_from_checkpoint, args, state.global_step)
        if checkpoint is None:
            return None
        if self.model is not None and not engine_restores_model(args, self.model):
            drop_adapters(self.model, self.checkpoint_folders())
            adapter = getattr(self.model, "active_adapter", "default")
            if restore_policy_adapter(self.model, checkpoint, adapter):
                self.warn(
                    f"the trainer did not restore the adapter from {Path(checkpoint) / ADAPTER_WEIGHTS} on resume; "
                    f"loaded it into {adapter!r}"
                )
        self.load(checkpoint, state.global_step)
        return checkpoint

    def load(self, checkpoint: str | os.PathLike[str], global_step: int | None = None) -> None:
        """Restore this callback's state from ``checkpoint`` (every rank), saved at ``global_step``."""

    def read_checkpoint_state(
        self, checkpoint: str | os.PathLike[str], folder: str, global_step: int | None, what: str, fallback: str
    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Tensors and metadata of ``checkpoint/folder``, verified; None, with a warning, when nothing holds them.

        A folder missing from the checkpoint is read from its staged copy when the run stopped before
        ``on_save`` moved it there (and copied into the checkpoint); when an older checkpoint beside it holds
        the folder, its absence is an error naming that checkpoint. Otherwise the warning reads:
        ``resuming from <checkpoint>, which holds no <folder>/<what>; <fallback>``.
        """
        path = Path(checkpoint) / folder
        if not path.is_dir():
            staged = staged_copy(checkpoint, folder)
            if staged is None or not staged.is_dir():
                self._refuse_if_an_older_checkpoint_holds(checkpoint, folder, what)
                self.warn(f"resuming from {checkpoint}, which holds no {folder}/{what}; {fallback}")
                return None
            saved = self._read_verified(staged, checkpoint, folder, global_step)
            self.warn(
                f"resuming from {checkpoint}, which holds no {folder}/{what}: the run stopped before the callback "
                f"moved it there from {staged}; restored from that complete copy (and copied into the checkpoint)"
            )
            if self._writer:
                copy_folder(staged, path)
            return saved
        return self._read_verified(path, checkpoint, folder, global_step)

    def _read_verified(
        self, path: Path, checkpoint: str | os.PathLike[str], folder: str, global_step: int | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        self._state_sources[folder] = path
        try:
            return read_state(path, global_step)
        except StateFileError as exc:
            raise StateFileError(f"{exc}. {resume_advice(checkpoint, folder)}") from exc

    def _refuse_if_an_older_checkpoint_holds(self, checkpoint: str | os.PathLike[str], folder: str, what: str) -> None:
        if not self.has_checkpoint_state():
            return
        older = newest_checkpoint_with(checkpoint, folder)
        if older is not None:
            raise ValueError(
                f"resuming from {checkpoint}, which holds no {folder}/{what} (the run stopped before it was "
                f"saved?), but {older} holds it. {resume_advice(checkpoint, folder, missing=True)}"
            )

    def restore_averager(
        self,
        weights: AveragedWeights,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        checkpoint: str | os.PathLike[str],
        folder: str,
    ) -> None:
        """``weights.load_state``; a state that lacks a part is an error naming its file and what to do."""
        try:
            weights.load_state(tensors, metadata)
        except StateFileError as exc:
            source = self._state_sources.get(folder, Path(checkpoint) / folder)
            raise StateFileError(f"{source / STATE_JSON}: {exc}. {resume_advice(checkpoint, folder)}") from exc

    # ---------------------------------------------------------------------- save
    def has_checkpoint_state(self) -> bool:
        """Whether ``on_save`` writes anything (set up, and saving enabled)."""
        return False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Stage the state when the trainer saves a checkpoint after this step (subclasses: call last)."""
        if control.should_save:
            self.stage(args, state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Wait for the updates (after the last epoch the trainer may load the best checkpoint into the weights);
        stage the state when the trainer saves a checkpoint now."""
        for runner in self.runners():
            runner.wait()
        if control.should_save:
            self.stage(args, state)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """``save_strategy="best"`` decides to save after the evaluation: stage at each one (subclasses: call last)."""
        strategy = getattr(args, "save_strategy", None)
        if self._training and getattr(strategy, "value", strategy) == "best":
            self.stage(args, state)

    def stage(self, args: TrainingArguments, state: TrainerState) -> None:
        """Write our folders for ``checkpoint-<step>`` to the staging folder, before the trainer writes it."""
        step = state.global_step
        if not self.has_checkpoint_state() or self._staged_step == step:
            return
        self.save(staged_folder(args.output_dir, step), step, self._writer)
        self._staged_step = step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.has_checkpoint_state():
            return
        step = state.global_step
        checkpoint = Path(checkpoint_folder(args, step))
        if self._staged_step == step:
            if self._writer:
                staged = staged_folder(args.output_dir, step)
                for folder in self.checkpoint_folders():
                    replace_folder(staged / folder, checkpoint / folder)
        else:
            self.save(checkpoint, step, self._writer)
        self._staged_step = None
        if self._writer:
            remove_stale_scratch(args.output_dir, step, self.checkpoint_folders())

    def save(self, parent: str | os.PathLike[str], global_step: int, writer: bool = True) -> None:
        """Write this callback's folders under ``parent``. Collective: call on every rank; ``writer`` writes."""

    # ------------------------------------------------------------ updates in flight
    def runners(self) -> list[UpdateRunner]:
        """Where this callback's averages update (:mod:`trl_ema_plugin.shadow.runner`): a side stream or a
        worker may still run an update when the callback returns."""
        return []

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The optimizer is about to write θ: an update still reading θ of the last step finishes its reads first."""
        for runner in self.runners():
            runner.before_weights_change()

    def close_runners(self) -> None:
        """Wait for every update and stop the worker threads (at train end)."""
        for runner in self.runners():
            runner.close()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove what stopped saves left in the scratch folder (subclasses: call last)."""
        self._training = False
        if self._writer and self.has_checkpoint_state():
            remove_stale_scratch(args.output_dir, None, self.checkpoint_folders())

    # ------------------------------------------------------------------ warnings
    def warn(self, message: str, category: type[UserWarning] = UserWarning) -> None:
        """A ``UserWarning`` (or ``category``) for the user at the console, and the same line in the run's log."""
        warnings.warn(message, category, stacklevel=3)
        logging.getLogger(type(self).__module__).warning(message)

    def report_skips(self, averaged: list[AveragedWeights], prefix: str, control: TrainerControl) -> None:
        """Warn when an averager began skipping non-finite weights; log each one's count at logging steps.

        Sharded weights: each rank skips on its own shard, and the ranks compare their counts only when saving
        (no collective per step): the count logged is the most of this rank's and the ranks' at the last save,
        and ranks that skipped different updates are warned about once.
        """
        for weights in averaged:
            key = f"{prefix}/{weights.name}/skipped_updates"
            if weights.skip_warning is not None:
                self.warn(f"{weights.skip_warning}. The logs count them as {key}")
                weights.skip_warning = None
            least, most = weights.rank_skips or (0, 0)
            skipped = max(weights.averager.skipped_updates, most)
            if control.should_log and skipped:
                self.record_metric(key, float(skipped))
            if least != most and weights.name not in self._uneven_skips:
                self._uneven_skips.add(weights.name)
                self.warn(
                    f"averager {weights.name!r}: at the last save the ranks had skipped {least} to {most} updates, "
                    "for NaN or inf in their own shards of the weights only (each rank checks its own shard, with "
                    "no collective per step); its rows average different steps, and checkpoints record rank 0's "
                    "counters"
                )

    # ------------------------------------------------------------------- metrics
    def record_metric(self, key: str, value: float) -> None:
        """Add ``value`` to the trainer's next training log under ``key`` (averaged with the others since the last).

        TRL's trainers (after :func:`attach`): their ``_metrics``; Axolotl's: ``store_metrics``; otherwise
        this callback adds it to the logs in ``on_log``.
        """
        metrics = getattr(self.trainer, "_metrics", None)
        store = getattr(self.trainer, "store_metrics", None)  # Axolotl's trainers: averaged into the next log
        if isinstance(metrics, dict) and isinstance(metrics.get("train"), dict):
            metrics["train"].setdefault(key, []).append(value)
        elif callable(store):
            store({key: value}, train_eval="train")
        else:
            self._own_metrics[key].append(value)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """For trainers without TRL's ``_metrics``: add the recorded metrics to the training logs (and to the
        entry the trainer appended to ``state.log_history`` for them)."""
        if logs is None or not self._own_metrics or any(k.startswith("eval_") for k in logs):
            return
        added = {key: sum(values) / len(values) for key, values in self._own_metrics.items() if values}
        logs.update(added)
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry is not logs and entry.get("step") == state.global_step:
            entry.update(added)
        self._own_metrics.clear()
