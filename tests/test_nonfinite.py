"""NaN or inf in the trained weights never enters an average unnoticed (``on_nonfinite: skip | error``).

Real TRL runs on the tiny Llama with LoRA. A callback writes NaN into one LoRA weight after the optimizer step
of step k and puts the value back before step k + 1 (or an inf gradient poisons the weights for good); the
averages are compared, bit for bit, with the float32 oracles of tests/oracles.py fed the same trajectory
without step k.
"""

from __future__ import annotations

import json
import math

import oracles
import pytest
import torch
import yaml
from ds_common import cpu_training_args
from peft import get_peft_model
from torch import nn
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl_helpers import WeightRecorder, lora_config, sft_trainer

from trl_ema_plugin import AveragerSpec, PostHocEMACallback, WeightAveragingCallback, attach
from trl_ema_plugin.config.flat_keys import weight_averaging_config_from_flat
from trl_ema_plugin.demos.tiny import tiny_dpo_dataset, tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback
from trl_ema_plugin.integrations.trl.reference import REFERENCE_FOLDER, AveragedReferenceCallback
from trl_ema_plugin.persistence import STATE_JSON
from trl_ema_plugin.shadow import AveragedWeights, LocalLayout, finite
from trl_ema_plugin.shadow.finite import FiniteCheck
from trl_ema_plugin.shadow.store import NonFiniteWeightsError

F32 = {"dtype": torch.float32}
K = 3  # the step whose weights hold NaN


def first_trainable(model) -> nn.Parameter:
    return next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


class NaNAfterStep(TrainerCallback):
    """NaN in one element of a LoRA weight from the end of step ``step`` until step ``step + 1`` begins."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved: torch.Tensor | None = None
        self.param: nn.Parameter | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.param = first_trainable(model)
            with torch.no_grad():
                self.saved = self.param.view(-1)[0].clone()
                self.param.view(-1)[0] = float("nan")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.saved is not None:
            with torch.no_grad():
                self.param.view(-1)[0] = self.saved
            self.saved = None


class InfGradientAt(TrainerCallback):
    """An inf gradient in one LoRA weight at step ``step``: AdamW turns the weight into NaN from then on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:  # the step being taken
            first_trainable(model).grad.view(-1)[0] = float("inf")


def without_step(trajectory: dict, step: int, decay: float) -> dict[str, torch.Tensor]:
    """The float32 EMA of ``trajectory`` (update every step from 0) with the update of ``step`` skipped."""
    before = oracles.ema(trajectory, decay=decay, at=step - 1, **F32)
    if step == max(trajectory):
        return before
    return oracles.ema(trajectory, decay=decay, resume={"step": step, "ema": before}, **F32)


def assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def logged(trainer, key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h]


# ---------------------------------------------------------------------------------------- skip
def test_a_nonfinite_step_is_skipped_warned_counted_and_restored(tmp_path):
    recorder, poison = WeightRecorder(), NaNAfterStep(K)
    averaging = WeightAveragingCallback(
        averagers=[{"method": "ema", "decay": 0.5}, {"method": "bema", "update_every": 1, "lag": 2.0}], eval=False
    )
    out = tmp_path / "run"
    trainer = sft_trainer(str(out), [recorder, poison, averaging], save_strategy="steps", save_steps=2)
    with pytest.warns(UserWarning) as caught:
        trainer.train()
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert messages == [
        f"averager 'ema' skipped its update at step {K}: the trained weights hold NaN or inf (on_nonfinite='skip'); "
        f"the average keeps its value of step {K - 1}, and every later step with non-finite weights is skipped "
        "too. The logs count them as averaging/ema/skipped_updates",
        f"averager 'bema' skipped its update at step {K}: the trained weights hold NaN or inf (on_nonfinite='skip'); "
        f"the average keeps its value of step {K - 1}, and every later step with non-finite weights is skipped "
        "too; until the next finite update BEMA outputs its EMA alone (θ of its last update, which the bias "
        "correction needs, is not kept when update_every=1). The logs count them as averaging/bema/skipped_updates",
    ]
    for name in ("ema", "bema"):
        averager = averaging.weights[name].averager
        assert (averager.skipped_updates, averager.last_skipped_step, averager.num_updates) == (1, K, 5)
        assert logged(trainer, f"averaging/{name}/skipped_updates") == [(t, 1.0) for t in range(K, 7)]
        assert all(torch.isfinite(b).all() for b in averager.buffers.values())
    # the average is the EMA of the same trajectory without step K, bit for bit
    assert_equal(averaging.averaged_tensors("ema"), without_step(recorder.weights, K, 0.5))
    # the state JSON carries the counters, and a resume restores them
    counters = json.loads((out / "checkpoint-4" / "averaged" / STATE_JSON).read_text())["counters"]
    assert (counters["skipped_updates"], counters["last_skipped_step"]) == (1, K)
    resumed = WeightAveragingCallback(
        averagers=[{"method": "ema", "decay": 0.5}, {"method": "bema", "update_every": 1, "lag": 2.0}], eval=False
    )
    trainer2 = sft_trainer(str(out), [resumed], save_strategy="steps", save_steps=2)
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert resumed.weights["ema"].averager.skipped_updates == 1
    assert logged(trainer2, "averaging/ema/skipped_updates")[-2:] == [(5, 1.0), (6, 1.0)]  # after steps 1-4's
    assert_equal(resumed.averaged_tensors("ema"), averaging.averaged_tensors("ema"))


def test_weights_poisoned_for_good_leave_the_last_finite_average(tmp_path):
    """An inf gradient at step K makes AdamW write NaN into the weight from then on: every later update is
    skipped (one warning), the averaged evaluation stays finite while the raw one is NaN, and the export holds
    the average of step K − 1."""
    recorder = WeightRecorder()
    averaging = WeightAveragingCallback(method="ema", decay=0.5)
    out = tmp_path / "run"
    trainer = sft_trainer(str(out), [recorder, InfGradientAt(K), averaging], eval_strategy="steps", eval_steps=2)
    attach(trainer)
    with pytest.warns(UserWarning, match=rf"averager 'ema' skipped its update at step {K}") as caught:
        trainer.train()
    assert sum("skipped" in str(w.message) for w in caught) == 1
    assert not torch.isfinite(first_trainable(trainer.model)).all()
    averager = averaging.weights["ema"].averager
    assert (averager.skipped_updates, averager.last_update_step) == (6 - K + 1, K - 1)
    final = {h["step"]: h for h in trainer.state.log_history if "eval_ema_loss" in h}
    # transformers leaves eval_loss out when every batch loss is NaN (logging_nan_inf_filter)
    assert math.isnan(final[6].get("eval_loss", math.nan)) and math.isfinite(final[6]["eval_ema_loss"])
    assert_equal(averaging.averaged_tensors("ema"), oracles.ema(recorder.weights, decay=0.5, at=K - 1, **F32))
    counters = json.loads((out / "averaged" / STATE_JSON).read_text())["counters"]
    assert counters["skipped_updates"] == 6 - K + 1


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_offloaded_updates_check_in_the_worker(tmp_path, mode):
    """offload=True: the update runs in a background thread on a host copy of θ_t; it checks that copy (no wait
    on the training device), skips exactly as inline, and its error surfaces in the training loop."""
    recorder = WeightRecorder()
    averaging = WeightAveragingCallback(method="ema", decay=0.5, offload=True, eval=False, on_nonfinite=mode)
    trainer = sft_trainer(str(tmp_path), [recorder, NaNAfterStep(K), averaging])
    if mode == "error":
        with pytest.raises(
            NonFiniteWeightsError, match=rf"averager 'ema': the trained weights hold NaN or inf at step {K}"
        ):
            trainer.train()
        return
    with pytest.warns(UserWarning, match=rf"averager 'ema' skipped its update at step {K}"):
        trainer.train()
    assert averaging.runner.schedule == "worker" and averaging.runner.updates_run == 7
    assert averaging.weights["ema"].averager.skipped_updates == 1
    assert_equal(averaging.averaged_tensors("ema"), without_step(recorder.weights, K, 0.5))


def test_bema_without_a_copy_of_theta_outputs_its_ema_until_the_next_finite_update():
    """BEMA with update_every=1 keeps no θ of its last update: while θ is not finite its output is its EMA alone,
    never NaN; the next finite update brings back the bias-corrected output."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    weights = AveragedWeights(
        AveragerSpec(method="bema", update_every=1, lag=2.0), LocalLayout(list(linear.named_parameters()))
    )
    weights.step(0)
    with torch.no_grad():
        linear.weight.add_(0.1)
    weights.step(1)
    with torch.no_grad():
        linear.weight[0, 0] = float("inf")
    weights.step(2)
    assert (weights.averager.skipped_updates, weights.averager.last_update_step) == (1, 1)
    ema = torch.cat([v.reshape(-1) for v in weights.averager.views("ema")])
    assert torch.equal(torch.cat([x.reshape(-1) for x in weights.average_local(2)]), ema)
    with torch.no_grad():
        linear.weight[0, 0] = 0.5
    assert weights.step(3) is True
    alpha = weights.averager.schedule.alpha(3)
    theta = torch.cat([p.detach().reshape(-1) for p in linear.parameters()])
    theta0 = torch.cat(weights.averager.views("theta0"))
    ema = torch.cat(weights.averager.views("ema"))
    torch.testing.assert_close(torch.cat(weights.average_local(3)), ema + alpha * (theta - theta0), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------- the check
def test_the_check_sums_groups_of_small_tensors_and_large_ones_alone(monkeypatch):
    """A list of tensors: one sum per group of consecutive small tensors of one dtype (copied into a buffer made
    once), one per tensor above the group size; NaN, inf or −inf anywhere makes it fail, large finite values do not."""
    monkeypatch.setattr(finite, "GROUP_ELEMENTS", 10)
    f32, bf16 = torch.float32, torch.bfloat16
    tensors = [
        torch.full((n,), 1e30, dtype=d) for n, d in [(3, f32), (4, f32), (12, f32), (2, f32), (2, bf16), (5, bf16)]
    ]
    check = FiniteCheck()
    assert check(tensors)
    assert check._groups == [(0, 2, 7), (2, 3, 12), (3, 4, 2), (4, 6, 7)]
    made = {kind: (b.data_ptr(), b.numel()) for kind, b in check.buffers.items()}
    assert {kind: n for kind, (_, n) in made.items()} == {(f32, torch.device("cpu")): 7, (bf16, torch.device("cpu")): 7}
    for index in range(len(tensors)):
        for value in ("nan", "inf", "-inf"):
            poisoned = [t.clone() for t in tensors]
            poisoned[index][-1] = float(value)
            assert not check(poisoned), (index, value)
            assert not check(torch.cat([x.float() for x in poisoned])), (index, value)  # flat: one sum
    assert check(tensors)
    assert {kind: (b.data_ptr(), b.numel()) for kind, b in check.buffers.items()} == made
    assert check.flat_copy(tensors) is None  # several groups: checked per group, averaged per tensor
    assert torch.equal(check.flat_copy(tensors[:2]), torch.cat(tensors[:2]))
    assert check([]) and check([torch.empty(0)]) and check(torch.empty(0))


# --------------------------------------------------------------------------------------- error
def test_error_mode_raises_naming_the_step_and_the_averager(tmp_path):
    averaging = WeightAveragingCallback(method="ema", decay=0.5, on_nonfinite="error")
    trainer = sft_trainer(str(tmp_path), [NaNAfterStep(K), averaging])
    expected = rf"averager 'ema': the trained weights hold NaN or inf at step {K} \(on_nonfinite='error'\)"
    with pytest.raises(NonFiniteWeightsError, match=expected):
        trainer.train()
    assert trainer.state.global_step == K
    assert all(torch.isfinite(b).all() for b in averaging.weights["ema"].averager.buffers.values())


def test_the_yaml_key_and_its_bad_values():
    config = weight_averaging_config_from_flat(
        yaml.safe_load("weight_averaging: ema\nweight_averaging_on_nonfinite: error\n")
    )
    assert config.on_nonfinite == "error"
    assert weight_averaging_config_from_flat({"weight_averaging": "ema"}).on_nonfinite == "skip"
    with pytest.raises(ValueError, match="weight_averaging_on_nonfinite") as raised:
        weight_averaging_config_from_flat({"weight_averaging": "ema", "weight_averaging_on_nonfinite": "ignore"})
    assert "skip" in str(raised.value) and "error" in str(raised.value)
    with pytest.raises(ValueError, match="on_nonfinite"):
        WeightAveragingCallback(method="ema", on_nonfinite="ignore")


# ---------------------------------------------------------------------- the other averagers
def test_dpo_reference_averager_skips_the_nonfinite_step(tmp_path):
    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_llama(tokenizer, seed=0), lora_config())
    reference = AveragedReferenceCallback("ema", decay=0.5, update_every=1, ref_update_every=1)
    recorder = WeightRecorder()
    args = cpu_training_args(
        str(tmp_path), DPOConfig, max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, max_length=64,
        logging_steps=1, save_strategy="steps", save_steps=4, gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=tiny_dpo_dataset(16, seed=0),
        processing_class=tokenizer,
        callbacks=[recorder, NaNAfterStep(K), reference],
    )
    with pytest.warns(UserWarning, match=rf"averager 'reference' skipped its update at step {K}"):
        trainer.train()
    assert logged(trainer, "reference/reference/skipped_updates") == [(t, 1.0) for t in range(K, 6)]
    metadata = json.loads((tmp_path / "checkpoint-4" / REFERENCE_FOLDER / STATE_JSON).read_text())
    assert metadata["averager"]["counters"]["skipped_updates"] == 1
    expected = without_step(recorder.weights, K, 0.5)
    got = reference.reference_tensors()
    for name, tensor in expected.items():
        assert torch.equal(got[name.replace(".default.", ".ref.")], tensor), name


def test_posthoc_emas_skip_the_nonfinite_step_warned_counted_and_checkpointed(tmp_path):
    """The post-hoc recorder's power EMAs skip the step like the averaging callback's; the logs count it, and the
    checkpoint state (staged before the trainer's checkpoint) records it."""
    posthoc = PostHocEMACallback(sigma_rels=[0.05], every=2, update_after=1)
    trainer = sft_trainer(str(tmp_path), [NaNAfterStep(K), posthoc], save_strategy="steps", save_steps=4)
    with pytest.warns(UserWarning, match=rf"averager 'sigma_rel_0.05' skipped its update at step {K}"):
        trainer.train()
    assert logged(trainer, "posthoc_ema/sigma_rel_0.05/skipped_updates") == [(t, 1.0) for t in range(K, 7)]
    (weights,) = posthoc.recorder.weights.values()
    assert weights.averager.skipped_updates == 1
    assert all(torch.isfinite(b).all() for b in weights.averager.buffers.values())
    metadata = json.loads((tmp_path / "checkpoint-4" / "posthoc_ema" / STATE_JSON).read_text())
    assert metadata["averagers"]["sigma_rel_0.05"]["counters"]["skipped_updates"] == 1
    assert not (tmp_path / ".trl_ema_plugin").exists()


class TeacherRecorder(TrainerCallback):
    def __init__(self, distillation: SelfDistillationCallback) -> None:
        self.distillation = distillation
        self.teacher: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        teacher = self.distillation.teacher
        self.teacher[state.global_step] = {
            n.replace(f".{teacher.name}.", ".default."): p.detach().clone() for n, p in teacher.parameters()
        }


def test_distillation_teacher_never_takes_nonfinite_weights(tmp_path):
    """The teacher adapter follows the averager: after the skipped step it keeps the average of step K − 1,
    and the distillation term stays finite."""
    recorder = WeightRecorder()
    averaging = WeightAveragingCallback(method="ema", decay=0.5)
    distillation = SelfDistillationCallback(lambda_=1.0)
    teacher = TeacherRecorder(distillation)
    trainer = sft_trainer(str(tmp_path), [recorder, NaNAfterStep(K), averaging, distillation, teacher], max_steps=5)
    attach(trainer)
    with pytest.warns(UserWarning, match=rf"averager 'ema' skipped its update at step {K}"):
        trainer.train()
    # the teacher of step t is written in step t's loss from the average of step t − 1
    assert_equal(teacher.teacher[K + 1], oracles.ema(recorder.weights, decay=0.5, at=K - 1, **F32))
    up_to_k_plus_1 = {s: w for s, w in recorder.weights.items() if s <= K + 1}
    assert_equal(teacher.teacher[K + 2], without_step(up_to_k_plus_1, K, 0.5))
    assert all(math.isfinite(v) for _, v in logged(trainer, "loss/distill"))
