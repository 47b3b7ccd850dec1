"""WeightAveragingCallback on real TRL SFTTrainer runs with tiny PEFT and full models."""

from __future__ import annotations

import os
import shutil
import warnings

import oracles
import pytest
import torch
from ds_common import cpu_training_args
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import BEMACallback
from trl_helpers import WeightRecorder, lora_config, sft_trainer

from trl_ema_plugin import AveragerSpec, ExtrapolationWarning, WeightAveragingCallback, attach
from trl_ema_plugin.config.advice import long_run_advice
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_tokenizer

BEMA_KW = dict(method="bema", update_every=1, update_after=2, lag=3.0, multiplier=0.5, ema_power=0.6, bias_power=0.3)


def assert_close_to_hand(averaged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-5):
    assert set(averaged) == set(expected)
    for name in expected:
        torch.testing.assert_close(averaged[name].double(), expected[name], rtol=tol, atol=tol)


def test_bema_matches_trl_bemacallback_on_full_model(tmp_path):
    """Full fine-tuning (TRL's callback fails on PEFT): both averages agree after N update steps."""
    hyper = dict(
        update_freq=2, update_after=2, lag=3, multiplier=0.5, ema_power=0.6, bias_power=0.3, min_ema_multiplier=0.01
    )
    ours = WeightAveragingCallback(method="bema", **hyper, eval=False, export_at_end=False)
    theirs = BEMACallback(**hyper)
    trainer = sft_trainer(str(tmp_path), [ours, theirs], peft=None, max_steps=8)
    trainer.train()
    averaged = ours.averaged_tensors()
    running = dict(theirs.running_model.named_parameters())
    moved = 0
    for name, value in averaged.items():
        torch.testing.assert_close(value, running[name].float(), rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(value, dict(trainer.model.named_parameters())[name].float()))
    assert moved > 0, "the average never moved away from the raw weights"


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_adapter_average_matches_hand_computation(tmp_path, kind):
    recorder = WeightRecorder()
    callback = WeightAveragingCallback(**BEMA_KW, eval=False)
    trainer = sft_trainer(str(tmp_path), [recorder, callback], peft=kind, max_steps=6)
    trainer.train()
    expected = oracles.averaged(recorder.weights, BEMA_KW)
    assert_close_to_hand(callback.averaged_tensors(), expected)
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n in expected)
    # the exported adapter loads with PEFT and holds the averaged weights
    base = tiny_llama(tiny_tokenizer(), seed=0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "averaged"))
    params = dict(loaded.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-5, atol=1e-5)
    # frozen base weights are untouched by the averaging
    raw_base = tiny_llama(tiny_tokenizer(), seed=0).state_dict()
    trained = trainer.model.get_base_model().state_dict()
    for name, value in raw_base.items():
        key = name if name in trained else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(trained[key], value), name


def test_bias_horizon_max_steps_fades_alpha_to_zero_at_the_runs_last_step(tmp_path):
    """``bias_horizon="max_steps"`` becomes the trainer's max_steps: α_T = 0, θ̂_T is BEMA's EMA alone."""
    recorder = WeightRecorder()
    faded = {**BEMA_KW, "bias_horizon": "max_steps"}
    callback = WeightAveragingCallback(averagers=[{**faded, "name": "faded"}, {**BEMA_KW, "name": "trl"}], eval=False)
    sft_trainer(str(tmp_path), [recorder, callback], max_steps=6).train()
    assert callback.weights["faded"].spec.bias_horizon == 6.0  # what its checkpoints keep
    expected = oracles.averaged(recorder.weights, {**BEMA_KW, "bias_horizon": 6})
    assert_close_to_hand(callback.averaged_tensors("faded"), expected)
    ema_alone = oracles.averaged(recorder.weights, {**BEMA_KW, "bias_power": 1e9})  # α_t = 0 at every step
    assert_close_to_hand(callback.averaged_tensors("faded"), ema_alone)
    trl = callback.averaged_tensors("trl")
    assert any(not torch.allclose(trl[n], ema_alone[n].float()) for n in trl), "TRL's α_T is not 0"


def test_lora_preset_runs_as_the_settings_it_names(tmp_path):
    """``preset="lora"`` in a real run: κ = 0.3, α_t faded at the trainer's max_steps, an update every step."""
    recorder = WeightRecorder()
    spelled = {"method": "bema", "ema_power": 0.3, "bias_horizon": "max_steps", "update_every": 1}
    averagers = [{"name": "preset", "method": "bema", "preset": "lora"}, {"name": "spelled", **spelled}]
    callback = WeightAveragingCallback(averagers=averagers, eval=False)
    sft_trainer(str(tmp_path), [recorder, callback], max_steps=5).train()
    assert callback.weights["preset"].spec.bias_horizon == 5.0
    got, spelled_out = callback.averaged_tensors("preset"), callback.averaged_tensors("spelled")
    assert all(torch.equal(got[n], spelled_out[n]) for n in got)
    expected = oracles.averaged(recorder.weights, {**spelled, "bias_horizon": 5})
    assert_close_to_hand(got, expected)


def test_several_averagers_in_one_run(tmp_path):
    recorder = WeightRecorder()
    ema_fast = {"name": "ema_fast", "method": "ema", "decay": 0.5, "update_after": 1, "update_every": 2}
    callback = WeightAveragingCallback(
        averagers=[ema_fast, {"name": "bema", **{k: v for k, v in BEMA_KW.items() if k != "method"}, "method": "bema"}],
        eval=False,
    )
    sft_trainer(str(tmp_path), [recorder, callback], max_steps=7).train()
    assert_close_to_hand(callback.averaged_tensors("ema_fast"), oracles.averaged(recorder.weights, ema_fast))
    assert (tmp_path / "averaged" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "averaged-bema" / "adapter_model.safetensors").is_file()


def test_full_finetune_with_offloaded_shadow(tmp_path):
    recorder = WeightRecorder()
    ema = {"method": "ema", "decay": 0.8, "update_after": 1}
    callback = WeightAveragingCallback(**ema, offload=True, eval=False)
    trainer = sft_trainer(str(tmp_path), [recorder, callback], peft=None, max_steps=4)
    trainer.train()
    assert all(b.device.type == "cpu" for b in callback.primary.averager.buffers.values())
    assert_close_to_hand(callback.averaged_tensors(), oracles.averaged(recorder.weights, ema))
    assert (tmp_path / "averaged" / "model.safetensors").is_file()


def test_updates_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    callback = WeightAveragingCallback(method="ema", decay=0.9, eval=False, export_at_end=False)
    sft_trainer(
        str(tmp_path), [callback], max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2
    ).train()
    assert callback.primary.averager.num_updates == 3


class SwapChecker(WeightRecorder):
    """After each evaluation (ours runs first), the raw weights are bit-identical to those of that step."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        now = self.snapshot(model)
        for name, value in self.weights[state.global_step].items():
            assert torch.equal(now[name], value), name
        self.checked += 1


@pytest.mark.parametrize("attached", [False, True])
def test_evaluation_with_averaged_weights_restores_raw_weights(tmp_path, attached):
    callback = WeightAveragingCallback(**BEMA_KW)
    checker = SwapChecker()
    trainer = sft_trainer(str(tmp_path), [callback, checker], max_steps=6, eval_strategy="steps", eval_steps=3)
    if attached:
        attach(trainer)
    trainer.train()
    assert checker.checked == 2
    evals = [h for h in trainer.state.log_history if "eval_bema_loss" in h]
    raw = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and len(raw) == 2
    assert evals[-1]["eval_bema_loss"] != raw[-1]
    if attached:  # every metric of the trainer, with the averager's infix
        assert "eval_bema_mean_token_accuracy" in evals[-1]


def test_averaged_eval_loss_equals_eval_loss_before_averaging_starts(tmp_path):
    """The trainer-free loss pass computes what the trainer's eval_loss computes."""
    callback = WeightAveragingCallback(method="ema", update_after=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = sft_trainer(str(tmp_path), [callback], max_steps=2, eval_strategy="steps", eval_steps=2)
        trainer.train()
    last = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    ours = [h for h in trainer.state.log_history if "eval_ema_loss" in h][-1]
    assert ours["eval_ema_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)


def test_metric_for_best_model_can_use_the_averaged_loss(tmp_path):
    callback = WeightAveragingCallback(**BEMA_KW)
    trainer = sft_trainer(
        str(tmp_path),
        [callback],
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="eval_bema_loss",
        greater_is_better=False,
    )
    trainer.train()
    assert trainer.state.best_metric is not None
    assert (tmp_path / "checkpoint-2" / "averaged" / "averager_state.json").is_file()


def _train_with_checkpoint(output_dir, **kw):
    callback = WeightAveragingCallback(
        averagers=[
            {"name": "bema", **{k: v for k, v in BEMA_KW.items() if k != "method"}, "method": "bema"},
            {"name": "ema", "method": "ema", "decay": 0.6, "update_every": 2, "update_after": 1},
        ],
        eval=False,
    )
    trainer = sft_trainer(output_dir, [callback], max_steps=8, save_strategy="steps", save_steps=4, **kw)
    return trainer, callback


@pytest.mark.parametrize("how", ["true", "outside_output_dir"])
def test_resume_is_bit_identical(tmp_path, how):
    full_dir = str(tmp_path / "full")
    trainer, callback = _train_with_checkpoint(full_dir)
    trainer.train()
    uninterrupted = {name: callback.averaged_tensors(name) for name in callback.weights}
    assert callback.weights["bema"].averager.num_updates == 6  # updates before and after step 4

    if how == "true":
        resume_dir = full_dir
        shutil.rmtree(os.path.join(full_dir, "checkpoint-8"))
        shutil.rmtree(os.path.join(full_dir, "averaged"))
        trainer2, callback2 = _train_with_checkpoint(resume_dir)
        trainer2.train(resume_from_checkpoint=True)
    else:
        elsewhere = str(tmp_path / "elsewhere")
        shutil.copytree(os.path.join(full_dir, "checkpoint-4"), elsewhere)
        trainer2, callback2 = _train_with_checkpoint(str(tmp_path / "resumed"))
        attach(trainer2)
        trainer2.train(resume_from_checkpoint=elsewhere)
    # transformers loads checkpoint sub-folders with an adapter as extra adapters; we drop ours
    assert set(trainer2.model.peft_config) == {"default"}
    for name, expected in uninterrupted.items():
        got = callback2.averaged_tensors(name)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)
    saved = load_file(
        os.path.join(full_dir if how == "true" else str(tmp_path / "resumed"), "averaged", "adapter_model.safetensors")
    )
    assert saved


def test_resume_outside_output_dir_without_attach_fails_clearly(tmp_path):
    """Without attach(), a callback cannot see a resume path outside output_dir: it says so."""
    trainer, _ = _train_with_checkpoint(str(tmp_path / "a"))
    trainer.train()
    shutil.copytree(str(tmp_path / "a" / "checkpoint-4"), str(tmp_path / "ckpt"))
    trainer2, _ = _train_with_checkpoint(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="attach"):
        trainer2.train(resume_from_checkpoint=str(tmp_path / "ckpt"))


def test_warns_when_the_settings_mean_no_update(tmp_path):
    callback = WeightAveragingCallback(method="bema")  # TRL's default update_freq=400
    with pytest.warns(UserWarning, match="never update"):
        sft_trainer(str(tmp_path), [callback], max_steps=3).train()


class StopAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def test_warns_when_bema_extrapolates_through_a_long_run(tmp_path):
    """Told at train begin from max_steps: 100 updates of unfaded BEMA (or OUEMA) warn, with α at the last update
    and the fixes; a bias_horizon, DEMA, or 99 updates do not."""
    averagers = [
        {"name": "bema", "method": "bema", "update_every": 1},  # t = 1..100: 100 updates
        {"name": "faded", "method": "bema", "update_every": 1, "bias_horizon": "max_steps"},
        {"name": "dema", "method": "dema", "update_every": 1},
        {"name": "ouema_99", "method": "ouema", "update_every": 1, "update_after": 1},  # t = 2..100: 99 updates
        {"name": "ouema", "method": "ouema", "update_every": 2},  # t = 2, 4..100: 50 updates
    ]
    callback = WeightAveragingCallback(averagers=averagers, eval=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft_trainer(str(tmp_path), [callback, StopAfterFirstStep()], max_steps=100).train()
    told = [str(w.message) for w in caught if issubclass(w.category, ExtrapolationWarning)]
    assert len(told) == 1, told
    alpha = (10 + 100) ** -0.2
    assert "averager 'bema' (bema) updates 100 times in this run of 100 steps" in told[0]
    assert f"(α_t = {alpha:.2f})" in told[0]
    assert "bias_horizon='max_steps'" in told[0] and "metric_for_best_model='eval_bema_loss'" in told[0]


def test_ouema_extrapolating_a_long_run_points_to_dema():
    advice = long_run_advice(AveragerSpec(method="ouema", update_every=1), max_steps=240)
    assert advice is not None and "method='dema'" in advice and "(α_t = 0.33)" in advice
    assert long_run_advice(AveragerSpec(method="bema"), max_steps=39_999) is None  # TRL's update_freq=400: 99 updates


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    callback = WeightAveragingCallback(method="ema")
    trainer = sft_trainer(str(tmp_path), [callback], peft=None, max_steps=1)
    for p in trainer.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        callback.setup(trainer.model, trainer.args)


def test_dpo_averaged_evaluation_without_attach_fails_before_training(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from trl_ema_plugin.demos.tiny import tiny_dpo_dataset

    tokenizer = tiny_tokenizer()
    args = cpu_training_args(
        str(tmp_path), DPOConfig, max_steps=2, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=1,
        max_length=64,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=tiny_llama(tokenizer),
        args=args,
        train_dataset=tiny_dpo_dataset(8),
        eval_dataset=tiny_dpo_dataset(4, seed=1),
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[WeightAveragingCallback(method="ema")],
    )
    with pytest.raises(ValueError, match="attach"):
        trainer.train()
    assert trainer.state.global_step == 0
