"""The averaged policy (WeightAveragingCallback) in GRPO, RLOO and KTO: updates after every optimizer step
(several per generation batch), checkpoints, resume, export, and averaged evaluation through the trainer's own
evaluation (GRPO's generation and reward included)."""

from __future__ import annotations

import oracles
import pytest
import torch
from peft import PeftModel
from rl_helpers import base_model, generation_trainer, kto_trainer, lora_policy
from safetensors.torch import load_file
from trl_helpers import WeightRecorder

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import letters_reward, tiny_prompt_dataset

BEMA_KW = dict(method="bema", update_every=1, update_after=1, lag=3.0, ema_power=0.6, bias_power=0.3)
BEMA_SETTINGS = {k: v for k, v in BEMA_KW.items() if k != "method"}
#: accumulation 2, steps_per_generation 4, num_iterations 2: one generation batch per 4 optimizer steps
SEVERAL_STEPS_PER_GENERATION = dict(
    gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=2, max_steps=6, save_strategy="steps",
    save_steps=2,
)  # fmt: skip


def assert_matches(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, rtol=1e-5, atol=1e-6)


def grpo_run(output_dir, resume=None):
    recorder = WeightRecorder()
    averaging = WeightAveragingCallback(**BEMA_KW, eval=False)
    trainer = generation_trainer("grpo", output_dir, [recorder, averaging], **SEVERAL_STEPS_PER_GENERATION)
    attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, averaging, recorder


def test_grpo_averages_every_optimizer_step_checkpoints_resumes_and_exports(tmp_path):
    full, averaging, recorder = grpo_run(tmp_path / "full")
    rewards = [h["step"] for h in full.state.log_history if "reward" in h]
    assert rewards == [1, 5]  # two generation batches for six optimizer steps
    weights = recorder.weights
    assert sorted(weights) == list(range(7)) and averaging.primary.averager.num_updates == 5  # steps 2..6
    assert_matches(averaging.averaged_tensors(), oracles.bema(weights, **BEMA_SETTINGS))
    # every checkpoint holds the averaged adapter of its step; the end export too, loadable with PEFT
    for step in (2, 4, 6):
        saved = load_file(str(tmp_path / "full" / f"checkpoint-{step}" / "averaged" / "adapter_model.safetensors"))
        expected = oracles.bema(weights, at=step, **BEMA_SETTINGS)
        assert len(saved) == len(expected)
        for name, value in expected.items():
            key = name.replace(".default.", ".")
            torch.testing.assert_close(saved[key].double(), value, rtol=1e-5, atol=1e-6)
    exported = PeftModel.from_pretrained(base_model(), str(tmp_path / "full" / "averaged"))
    params = dict(exported.named_parameters())
    for name, value in oracles.bema(weights, **BEMA_SETTINGS).items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-5, atol=1e-6)

    # resume at the generation boundary 4 (outside output_dir): updates 5, 6 continue the same average
    _, resumed_averaging, resumed_recorder = grpo_run(
        tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4")
    )
    assert resumed_averaging.primary.averager.num_updates == 5
    for t in (5, 6):
        assert_matches(resumed_recorder.weights[t], {n: w.double() for n, w in weights[t].items()})
    assert_matches(resumed_averaging.averaged_tensors(), oracles.bema(weights, **BEMA_SETTINGS))


class WeightsAtReward:
    """A reward function that also records, at each call, whether the model trains and its policy adapter."""

    def __init__(self) -> None:
        self.model = None
        self.calls: list[tuple[bool, dict[str, torch.Tensor]]] = []
        self.__name__ = "letters_reward"

    def __call__(self, completions, **kwargs):
        self.calls.append((self.model.training, WeightRecorder.snapshot(self.model)))
        return letters_reward(completions)


def test_grpo_averaged_evaluation_generates_with_the_averaged_weights(tmp_path):
    """After attach, each evaluation runs GRPO's own evaluation again under the swap: the eval completions are
    sampled and rewarded with the averaged adapter, logged as eval_ema_reward (and every other eval metric)."""
    reward = WeightsAtReward()
    recorder = WeightRecorder()
    averaging = WeightAveragingCallback(method="ema", decay=0.5, update_after=1)
    model, _ = lora_policy()
    reward.model = model
    trainer = generation_trainer(
        "grpo", tmp_path, [recorder, averaging], model=model, reward=reward, max_steps=4, eval_strategy="steps",
        eval_steps=2, eval_dataset=tiny_prompt_dataset(1, seed=1),
    )  # fmt: skip
    attach(trainer)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_ema_reward" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for key in ("eval_ema_loss", "eval_ema_kl", "eval_ema_completions/mean_length"):
        assert all(key in h for h in evals), (key, sorted(evals[-1]))
    assert [h["step"] for h in trainer.state.log_history if "eval_reward" in h] == [2, 4]  # the raw evaluation
    in_eval = [weights for training, weights in reward.calls if not training]
    assert len(in_eval) == 4  # per evaluation: the eval batch (1 prompt × 4 completions) raw, then averaged
    for index, step in enumerate((2, 4)):
        raw, averaged = in_eval[2 * index], in_eval[2 * index + 1]
        assert_matches(raw, {n: w.double() for n, w in recorder.weights[step].items()})
        assert_matches(averaged, oracles.ema(recorder.weights, at=step, update_after=1, decay=0.5))
    assert_matches(WeightRecorder.snapshot(model), {n: w.double() for n, w in recorder.weights[4].items()})


@pytest.mark.parametrize("kind", ["rloo", "kto"])
def test_rloo_and_kto_give_every_eval_metric_for_the_averager(tmp_path, kind):
    averaging = WeightAveragingCallback(method="ema", decay=0.5)
    common = dict(max_steps=2, eval_strategy="steps", eval_steps=2)
    if kind == "kto":
        trainer = kto_trainer(tmp_path, [averaging], model=lora_policy()[0], **common)
        keys = ("eval_ema_loss", "eval_ema_rewards/chosen", "eval_ema_kl")
    else:
        eval_set = tiny_prompt_dataset(2, seed=1)
        trainer = generation_trainer(kind, tmp_path, [averaging], eval_dataset=eval_set, **common)
        keys = ("eval_ema_loss", "eval_ema_reward", "eval_ema_kl")
    attach(trainer)
    trainer.train()
    averaged = [h for h in trainer.state.log_history if "eval_ema_loss" in h][-1]
    raw = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    for key in keys:
        assert key in averaged and key.replace("eval_ema_", "eval_") in raw, (key, sorted(averaged))
    if kind == "kto":
        assert averaged["eval_ema_loss"] != raw["eval_loss"]


def test_label_free_evaluation_needs_attach(tmp_path):
    trainer = generation_trainer(
        "grpo", tmp_path, [WeightAveragingCallback(method="ema", decay=0.5)], eval_strategy="steps", eval_steps=1,
        eval_dataset=tiny_prompt_dataset(2, seed=1),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"evaluating averaged weights in a GRPO run needs the trainer.*attach"):
        trainer.train()
