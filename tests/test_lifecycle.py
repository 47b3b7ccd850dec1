"""PluginCallback: the life cycle a new feature inherits (config or fields, attach by type, save, resume).

A fourth feature written the way issue 15's callbacks will be: a step counter that keeps its count in
``checkpoint-N/step_counter/``, driven by a real SFTTrainer.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from transformers import TrainerCallback
from trl_helpers import sft_trainer

from trl_ema_plugin import attach
from trl_ema_plugin.integrations.trl import PluginCallback
from trl_ema_plugin.model_helpers import unwrap_model
from trl_ema_plugin.persistence import write_state_folder


class CounterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int = 0


class StepCounter(PluginCallback):
    """Counts optimizer steps; the count survives a resume."""

    config_class = CounterConfig
    folder = "step_counter"

    def setup(self, model, args):
        self.model = unwrap_model(model)
        self.count = self.config.start

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1

    def checkpoint_folders(self):
        return [self.folder]

    def has_checkpoint_state(self):
        return True

    def save(self, parent, global_step, writer=True):
        if writer:
            write_state_folder(Path(parent) / self.folder, {"count": torch.tensor([self.count])}, {}, global_step)

    def load(self, checkpoint, global_step=None):
        saved = self.read_checkpoint_state(checkpoint, self.folder, global_step, "", "the count starts at start")
        if saved is not None:
            self.count = int(saved[0]["count"])


class ForeignCallback(TrainerCallback):
    """Another package's callback that happens to have an ``attach_to`` method."""

    attached = False

    def attach_to(self, trainer):
        self.attached = True


def test_config_or_fields_not_both():
    assert StepCounter(start=3).config.start == 3
    assert StepCounter(config=CounterConfig(start=2)).config.start == 2
    with pytest.raises(ValueError, match=r"pass either config=CounterConfig\(...\) or its fields, not both"):
        StepCounter(config=CounterConfig(), start=1)
    with pytest.raises(TypeError, match="config= takes a CounterConfig, got dict"):
        StepCounter(config={"start": 1})


def test_attach_selects_our_callbacks_by_type(tmp_path):
    foreign = ForeignCallback()
    with pytest.raises(ValueError, match="found none of trl_ema_plugin's callbacks"):
        attach(sft_trainer(str(tmp_path / "a"), [foreign], max_steps=1))
    counter = StepCounter()
    trainer = sft_trainer(str(tmp_path / "b"), [foreign, counter], max_steps=1)
    attach(trainer)
    assert counter.trainer is trainer
    assert not foreign.attached


def _counter_run(output_dir: str, max_steps: int = 8) -> tuple[object, StepCounter]:
    counter = StepCounter(start=100)
    trainer = sft_trainer(output_dir, [counter], max_steps=max_steps, save_strategy="steps", save_steps=4)
    return attach(trainer), counter


def test_state_is_saved_and_restored_from_any_path(tmp_path):
    trainer, counter = _counter_run(str(tmp_path / "full"))
    trainer.train()
    assert counter.count == 108
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "step_counter" / "averager_state.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint, elsewhere)
    trainer2, counter2 = _counter_run(str(tmp_path / "resumed"))
    trainer2.train(resume_from_checkpoint=str(elsewhere))
    assert counter2.count == 108  # 104 restored, then steps 5..8


def test_missing_folder_warns_and_starts_afresh(tmp_path):
    trainer, _ = _counter_run(str(tmp_path / "full"))
    trainer.train()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", elsewhere)
    shutil.rmtree(elsewhere / "step_counter")
    trainer2, counter2 = _counter_run(str(tmp_path / "resumed"))
    expected = f"resuming from {elsewhere}, which holds no step_counter/; the count starts at start"
    with pytest.warns(UserWarning, match=re.escape(expected)):
        trainer2.train(resume_from_checkpoint=str(elsewhere))
    assert counter2.count == 104
    assert os.path.isdir(tmp_path / "resumed" / "checkpoint-8" / "step_counter")
