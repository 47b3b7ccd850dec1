"""``PostHocEMACallback``: record power-function EMAs as snapshots, to choose the EMA length after training (EDM2).

``SFTTrainer(..., callbacks=[PostHocEMACallback()])`` keeps the EMAs of σ_rel 0.05 and 0.10 (one fp32 copy of the
trainable weights each; 1/world per rank under ZeRO and FSDP2) and writes ``output_dir/posthoc/``:
``theta0.safetensors`` once, ``snapshot-<step>.safetensors`` every ``every`` steps and at the last step, and the
model description that ``ema-export --posthoc-sigma-rel`` needs. Checkpoints carry the EMAs
(``checkpoint-N/posthoc_ema/``), so a resumed run writes the snapshots an uninterrupted one would have written;
the snapshots after step N, of the abandoned trajectory, are moved aside. The recorder itself is
:class:`~trl_ema_plugin.posthoc.recorder.PostHocRecorder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from ...config.posthoc import PostHocEMAConfig
from ...distributed import is_writer
from ...model_helpers import unwrap_model
from ...persistence import write_state_folder
from ...posthoc.model_files import describe_model
from ...posthoc.recorder import PostHocRecorder
from ...posthoc.snapshots import POSTHOC_FOLDER
from ...shadow.runner import UpdateRunner
from ..parallel import trainable_shadow
from .lifecycle import PluginCallback

#: the logs count the updates each post-hoc EMA skipped (non-finite weights) as ``posthoc_ema/<name>/skipped_updates``
SKIPPED_PREFIX = "posthoc_ema"

CHECKPOINT_FOLDER = "posthoc_ema"


class PostHocEMACallback(PluginCallback):
    """Post-hoc EMA recorder; arguments are those of :class:`~trl_ema_plugin.config.posthoc.PostHocEMAConfig`."""

    config_class = PostHocEMAConfig
    config: PostHocEMAConfig

    def __init__(self, config: PostHocEMAConfig | None = None, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.recorder: PostHocRecorder | None = None
        self._writer = False
        self._max_steps = 0
        self._load_best = False

    @property
    def folder(self) -> Path:
        """``output_dir/posthoc/`` of the current run (set up at train begin)."""
        assert self.recorder is not None, "PostHocEMACallback.folder read before train begin"
        return self.recorder.folder

    # ------------------------------------------------------------------ train begin
    def check_run(self, args: TrainingArguments, state: TrainerState) -> None:
        self._writer = is_writer(state)
        self._max_steps = state.max_steps
        self._load_best = bool(getattr(args, "load_best_model_at_end", False))
        if 0 < state.max_steps <= self.config.update_after:
            self.warn(
                f"post-hoc EMA will record nothing: it starts at step update_after={self.config.update_after}, "
                f"but training stops at step {state.max_steps}"
            )

    def setup(self, model: nn.Module, args: TrainingArguments) -> None:
        self.model = unwrap_model(model)
        layout, device, runner = trainable_shadow(self.model, args, self.config.offload)
        every = self.config.snapshot_every(self._max_steps)
        folder = Path(args.output_dir) / POSTHOC_FOLDER
        self.recorder = PostHocRecorder(self.config, layout, folder, every, device, runner)

    def runners(self) -> list[UpdateRunner]:
        return [] if self.recorder is None else [self.recorder.runner]

    def start(self, global_step: int) -> None:
        assert self.recorder is not None and self.model is not None
        moved = self.recorder.begin(global_step, self._writer)
        if self._writer:
            describe_model(self.model, self.recorder.layout.names, self.recorder.folder)
        if moved:
            self.warn(
                f"moved {len(moved)} post-hoc EMA file(s) that do not belong to this run's trajectory (written after "
                f"step {global_step}, or by another run) to {moved[0].parent}"
            )

    # ------------------------------------------------------------------------ steps
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.step(state.global_step, self._writer)
            self.report_skips(list(self.recorder.weights.values()), SKIPPED_PREFIX, control)
            if state.global_step >= state.max_steps:
                self.recorder.finish(state.global_step, self._writer)
        super().on_step_end(args, state, control, **kwargs)  # stages the checkpoint's state when the trainer saves

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A last snapshot if training stopped early; without θ when the trainer loaded the best checkpoint."""
        if self.recorder is not None:
            self.recorder.finish(state.global_step, self._writer, with_weights=not self._load_best)
        self.close_runners()
        super().on_train_end(args, state, control, **kwargs)

    # ------------------------------------------------------------------- checkpoints
    def checkpoint_folders(self) -> list[str]:
        return [CHECKPOINT_FOLDER]

    def has_checkpoint_state(self) -> bool:
        return self.recorder is not None

    def save(self, parent: str | os.PathLike[str], global_step: int, writer: bool = True) -> None:
        """``checkpoint-N/posthoc_ema/``: the EMAs' fp32 state (collective: call on every rank)."""
        assert self.recorder is not None
        tensors = self.recorder.state_tensors()
        if writer:
            write_state_folder(Path(parent) / CHECKPOINT_FOLDER, tensors, self.recorder.state_metadata(), global_step)

    def load(self, checkpoint: str | os.PathLike[str], global_step: int | None = None) -> None:
        assert self.recorder is not None
        saved = self.read_checkpoint_state(
            checkpoint,
            CHECKPOINT_FOLDER,
            global_step,
            "",
            "the post-hoc EMAs start again from the current weights, and the earlier snapshots are moved aside",
        )
        if saved is not None:
            self.recorder.load_state(*saved, where=str(Path(checkpoint) / CHECKPOINT_FOLDER))
