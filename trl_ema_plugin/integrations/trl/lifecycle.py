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
  where it did not; then :meth:`~PluginCallback.load`. A checkpoint without our folder is a warning and
  the feature starts afresh (:meth:`~PluginCallback.read_checkpoint_state`).
* **Updates in flight**: an average may update on a side CUDA stream or in a worker thread
  (:meth:`~PluginCallback.runners`): ``on_pre_optimizer_step`` makes the optimizer wait for the update's
  reads of θ, ``on_epoch_end`` and every reader of the averages wait for the update itself.
* **Save**: ``on_save`` calls :meth:`~PluginCallback.save` for ``checkpoint-N`` on every rank (the gathers
  are collective); global rank 0 writes, each folder atomically
  (:func:`~trl_ema_plugin.persistence.write_state_folder`).
* **Warnings** reach both the user (``UserWarning``) and the run's log (:meth:`~PluginCallback.warn`).

A new feature names its ``config_class``, fills in the train-begin steps it needs and, if it keeps
state in checkpoints, ``checkpoint_folders``, ``has_checkpoint_state``, ``save`` and ``load``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...config import AveragerSpec
from ...distributed import is_writer
from ...model_files import ADAPTER_WEIGHTS
from ...persistence import read_state
from ...shadow.runner import UpdateRunner
from ..parallel import engine_restores_model
from .checkpoint_adapters import drop_adapters, restore_policy_adapter
from .resume import checkpoint_folder, find_resume_checkpoint


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
        self.run_max_steps = 0  # the trainer's max_steps, set at train begin (for bias_horizon="max_steps")

    @classmethod
    def build_config(cls, **fields: Any) -> Any:
        """The config from keyword arguments (a subclass may accept aliases here)."""
        return cls.config_class(**fields)

    def attach_to(self, trainer: Any) -> None:
        """Called by :func:`trl_ema_plugin.attach` with the trainer, before ``trainer.train()``."""
        self.trainer = trainer

    # --------------------------------------------------------------- train begin
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        **kwargs: Any,
    ) -> None:
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
        """Tensors and metadata of ``checkpoint/folder``; None, with a warning, when the folder is missing.

        The warning reads: ``resuming from <checkpoint>, which holds no <folder>/<what>; <fallback>``.
        """
        path = Path(checkpoint) / folder
        if not path.is_dir():
            self.warn(f"resuming from {checkpoint}, which holds no {folder}/{what}; {fallback}")
            return None
        return read_state(path, global_step)

    # ---------------------------------------------------------------------- save
    def has_checkpoint_state(self) -> bool:
        """Whether ``on_save`` writes anything (set up, and saving enabled)."""
        return False

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.has_checkpoint_state():
            self.save(checkpoint_folder(args, state.global_step), state.global_step, is_writer(state))

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

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Wait for the updates: after the last epoch the trainer may load the best checkpoint into the weights."""
        for runner in self.runners():
            runner.wait()

    def close_runners(self) -> None:
        """Wait for every update and stop the worker threads (at train end)."""
        for runner in self.runners():
            runner.close()

    # ------------------------------------------------------------------ warnings
    def warn(self, message: str) -> None:
        """A ``UserWarning`` for the user at the console, and the same line in the run's log."""
        warnings.warn(message, UserWarning, stacklevel=3)
        logging.getLogger(type(self).__module__).warning(message)


def never_updates(spec: AveragerSpec, max_steps: int) -> str | None:
    """Why averager ``spec`` never updates in a run of ``max_steps`` optimizer steps, or None when it does."""
    if max_steps <= 0 or spec.first_update_step() <= max_steps:
        return None
    return (
        f"it starts at step update_after={spec.update_after} and updates every update_every={spec.cadence} steps, "
        f"but training stops at step {max_steps}"
    )
