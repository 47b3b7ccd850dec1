"""How the callback meets the rest of transformers' Trainer: best-model loading, evaluation sets,
resume arguments, adapter names, and settings that change between a run and its resume."""

from __future__ import annotations

import os

import oracles
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from trl import SFTTrainer
from trl_helpers import WeightRecorder, lora_config, sft_args, sft_trainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer
from trl_ema_plugin.persistence import read_state, write_state

BEMA_KW = dict(method="bema", update_every=1, update_after=1, lag=3.0, ema_power=0.6, bias_power=0.3)


def test_load_best_model_at_end_does_not_leak_into_the_bema_export(tmp_path):
    """The trainer loads the best checkpoint before on_train_end; BEMA's θ_T must stay the last step's."""
    recorder = WeightRecorder()
    callback = WeightAveragingCallback(**BEMA_KW, eval=False)
    trainer = sft_trainer(
        str(tmp_path), [recorder, callback], max_steps=6, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,  # the worst loss: an early checkpoint
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint is not None
    assert not trainer.state.best_model_checkpoint.endswith("checkpoint-6")
    live = WeightRecorder.snapshot(trainer.model)
    assert any(not torch.equal(live[n], recorder.weights[6][n]) for n in live)  # the best weights were loaded
    expected = oracles.averaged(recorder.weights, BEMA_KW)
    exported = PeftModel.from_pretrained(tiny_llama(tiny_tokenizer(), seed=0), str(tmp_path / "averaged"))
    params = dict(exported.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-5, atol=1e-6)


def test_averaged_evaluation_uses_the_dataset_of_the_evaluation(tmp_path):
    """``trainer.evaluate(eval_dataset=...)`` and dict eval sets: the averaged metrics use that same set."""
    callback = WeightAveragingCallback(method="ema", decay=0.5, update_after=1)
    trainer = attach(sft_trainer(str(tmp_path), [callback], max_steps=3))
    trainer.eval_dataset = None  # a trainer built without an eval set
    trainer.train()
    small, other = tiny_sft_dataset(4, seed=3), tiny_sft_dataset(4, seed=4)
    first = trainer.evaluate(eval_dataset=small)
    second = trainer.evaluate(eval_dataset=other)
    assert first["eval_ema_loss"] != second["eval_ema_loss"]
    again = trainer.evaluate(eval_dataset=small)
    assert again["eval_ema_loss"] == pytest.approx(first["eval_ema_loss"], rel=1e-6)
    named = trainer.evaluate(eval_dataset={"small": small, "other": other})
    assert named["eval_small_ema_loss"] == pytest.approx(first["eval_ema_loss"], rel=1e-6)
    assert named["eval_other_ema_loss"] == pytest.approx(second["eval_ema_loss"], rel=1e-6)


def _checkpointed_run(output_dir: str, **averager: object) -> tuple[SFTTrainer, WeightAveragingCallback]:
    callback = WeightAveragingCallback(**(averager or BEMA_KW), eval=False)
    trainer = sft_trainer(output_dir, [callback], max_steps=4, save_strategy="steps", save_steps=2)
    return trainer, callback


def test_positional_resume_argument_after_attach(tmp_path):
    first, done = _checkpointed_run(str(tmp_path / "a"))
    first.train()
    trainer, callback = _checkpointed_run(str(tmp_path / "b"))
    attach(trainer).train(str(tmp_path / "a" / "checkpoint-2"))  # Trainer.train's first positional argument
    for name, value in done.averaged_tensors().items():
        assert torch.equal(callback.averaged_tensors()[name], value), name


def test_resume_argument_in_training_arguments_alone_is_not_a_resume(tmp_path):
    """Trainer.train() ignores TrainingArguments.resume_from_checkpoint: so does the averaging."""
    first, _ = _checkpointed_run(str(tmp_path / "a"))
    first.train()
    callback = WeightAveragingCallback(**BEMA_KW, eval=False)
    args = sft_args(str(tmp_path / "b"), max_steps=2, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    trainer = sft_trainer(str(tmp_path / "b"), [callback], max_steps=2)
    trainer.args = args
    trainer.train()
    assert trainer.state.global_step == 2
    averager = callback.primary.averager
    assert (averager.num_updates, averager.last_update_step) == (1, 2)  # started at step 1, not restored from 4


def test_resume_with_changed_settings_names_them(tmp_path):
    first, _ = _checkpointed_run(str(tmp_path), method="ema", decay=0.9, update_after=1)
    first.train()
    trainer, _ = _checkpointed_run(str(tmp_path), method="ema", decay=0.5, update_after=1)
    with pytest.raises(ValueError, match=r"other settings than this run \(decay: 0.9 → 0.5\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_state_saved_at_another_step_is_refused(tmp_path):
    write_state(tmp_path, {"ema/w": torch.zeros(2)}, {"name": "ema"}, global_step=3)
    assert read_state(tmp_path, 3)[1]["global_step"] == 3
    with pytest.raises(ValueError, match="saved at step 3, but the trainer resumed at step 5"):
        read_state(tmp_path, 5)


def test_an_adapter_not_named_default(tmp_path):
    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_llama(tokenizer, seed=0), lora_config(), adapter_name="sft")
    callback = WeightAveragingCallback(method="ema", decay=0.5, update_after=1, eval=False)
    trainer = sft_trainer(str(tmp_path), [callback], peft=None, model=model, max_steps=2)
    trainer.train()
    saved = load_file(os.path.join(tmp_path, "averaged", "adapter_model.safetensors"))
    averaged = callback.averaged_tensors()
    assert len(saved) == len(averaged) > 0
    for name, value in averaged.items():
        assert torch.equal(saved[name.replace(".sft.", ".")], value), name
