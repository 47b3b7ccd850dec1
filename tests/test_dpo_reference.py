"""The moving DPO reference ("ref" adapter = averaged policy adapter) and weight averaging in DPO runs.

Real TRL DPOTrainer runs on a tiny Llama with LoRA; expectations are computed by hand from the
per-step policy weights recorded during the same run.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import oracles
import pytest
import torch
from conftest import launch_two_ranks
from ds_common import cpu_training_args
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_ema_plugin.config.dpo_reference import DPOReferenceConfig
from trl_ema_plugin.demos.tiny import tiny_llama
from trl_ema_plugin.integrations.trl import WeightAveragingCallback, attach
from trl_ema_plugin.integrations.trl.dpo_reference import (
    REFERENCE_FOLDER,
    AveragedReferenceCallback,
    add_reference_adapter,
)

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
# BEMA with non-default hyper-parameters: it starts at step 1 and moves at every step
BEMA = {"update_every": 1, "update_after": 1, "lag": 2.0, "ema_power": 0.6, "bias_power": 0.3, "multiplier": 1.5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """2 shared cores: one intra-op thread is ~10x faster for a tiny model than oversubscribed threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_policy(tokenizer, seed: int = 0):
    """(PeftModel, a copy of its base model taken before wrapping)."""
    base = tiny_llama(tokenizer, seed=seed)
    initial_base = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(**LORA)), initial_base


def dpo_args(tmp_path, **overrides) -> DPOConfig:
    values = dict(max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, max_length=64, logging_steps=1,
                  gradient_checkpointing=False, seed=0)  # fmt: skip
    return cpu_training_args(str(tmp_path), DPOConfig, **{**values, **overrides})


def adapter_values(model, adapter: str) -> list[torch.Tensor]:
    """The adapter's tensors, in the order of the policy adapter's names."""
    return [p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n]


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


class Recorder(TrainerCallback):
    """θ_t (policy adapter) and ref_t ("ref" adapter) after every optimizer step; put it after ours."""

    def __init__(self, model) -> None:
        self.model = model
        self.theta: dict[int, list[torch.Tensor]] = {}
        self.ref: dict[int, list[torch.Tensor]] = {}
        self.step = 0

    def _record(self, step: int) -> None:
        self.step = step
        self.theta[step] = adapter_values(self.model, "default")
        self.ref[step] = adapter_values(self.model, "ref")

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)


def capture_reference_forwards(model, recorder: Recorder) -> list[tuple[int, dict, torch.Tensor, torch.Tensor]]:
    """Record every forward that DPOTrainer runs with the "ref" adapter active: (step, inputs, log-probs, mask)."""
    captured = []

    def hook(module, args, kwargs, output):
        if torch.is_grad_enabled() or module.active_adapter != "ref":
            return
        ids = kwargs["input_ids"]
        inputs = {"input_ids": ids.clone(), "attention_mask": kwargs["attention_mask"].clone()}
        if getattr(output, "log_probs", None) is not None:  # TRL 1.16: fused LM head, log-probs of the labels
            logps, mask = output.log_probs.detach().clone(), kwargs["labels"][:, 1:] != -100
        else:  # TRL 1.9: logits
            logps, mask = next_token_logps(output.logits.detach(), ids), kwargs["attention_mask"][:, 1:].bool()
        captured.append((recorder.step, inputs, logps, mask))

    model.register_forward_hook(hook, with_kwargs=True)
    return captured


def next_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def hand_bema(thetas: dict[int, list[torch.Tensor]], t: int) -> list[torch.Tensor]:
    """The reference at sync step t: BEMA (spec ``BEMA``) of the policy adapters θ_τ..θ_t, by the oracle, in fp32."""
    return [x.float() for x in oracles.bema(thetas, **BEMA, at=t)]


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------- BEMA reference
@pytest.fixture(scope="module")
def bema_run(tmp_path_factory, tokenizer, dpo_data):
    """5 DPO steps; BEMA reference synced every 2 steps (steps 2 and 4)."""
    model, initial_base = lora_policy(tokenizer)
    base_before = base_weights(model)
    reference = AveragedReferenceCallback("bema", ref_update_every=2, **BEMA)
    recorder = Recorder(model)
    captured = capture_reference_forwards(model, recorder)
    trainer = DPOTrainer(
        model=model,
        args=dpo_args(tmp_path_factory.mktemp("bema")),
        train_dataset=dpo_data[0],
        processing_class=tokenizer,
        callbacks=[reference, recorder],
    )
    trainer.train()
    return {
        "model": model,
        "initial_base": initial_base,
        "base_before": base_before,
        "recorder": recorder,
        "captured": captured,
        "callback": reference,
    }


def test_reference_is_hand_bema_on_sync_steps_and_unchanged_between(bema_run):
    rec = bema_run["recorder"]
    assert sorted(rec.ref) == [0, 1, 2, 3, 4, 5]
    assert all_equal(rec.ref[0], rec.theta[0])  # starts as the initial policy adapter
    assert not all_equal(rec.theta[5], rec.theta[0])  # the policy trained
    for t in range(1, 6):
        if t in (2, 4):  # sync steps: ref = BEMA of the policy at t
            assert not all_equal(rec.ref[t], rec.ref[t - 1]), f"reference did not move at sync step {t}"
            assert_close(rec.ref[t], hand_bema(rec.theta, t))
            assert not all_equal(rec.ref[t], rec.theta[t])  # an average, not a copy
        else:
            assert all_equal(rec.ref[t], rec.ref[t - 1]), f"reference moved at step {t}, not a sync step"
    assert bema_run["callback"].last_sync_step == 4


def assert_reference_log_probs(captured, adapter_at_step: dict[int, list[torch.Tensor]], initial_base) -> None:
    """Each captured reference forward equals a fresh base model + the expected adapter of its step."""
    hand_model = get_peft_model(copy.deepcopy(initial_base), LoraConfig(**LORA)).eval()
    lora_params = [p for n, p in hand_model.named_parameters() if ".default." in n]
    for step, inputs, logps, mask in captured:
        with torch.no_grad():
            for p, v in zip(lora_params, adapter_at_step[step], strict=True):
                p.copy_(v)
            expected = next_token_logps(hand_model(**inputs).logits, inputs["input_ids"])
        torch.testing.assert_close(logps[mask], expected[mask], atol=1e-4, rtol=1e-5)
        assert not torch.equal(logps[mask], torch.zeros_like(logps[mask]))


def test_reference_log_probs_are_base_plus_hand_averaged_adapter(bema_run):
    """The log-probs DPOTrainer computed with "ref" equal a fresh base model + the hand-averaged adapter."""
    rec, captured = bema_run["recorder"], bema_run["captured"]
    assert [step for step, *_ in captured] == [0, 1, 2, 3, 4]  # one reference forward per step, through "ref"
    expected = {0: rec.theta[0], 1: rec.theta[0], 2: hand_bema(rec.theta, 2), 3: hand_bema(rec.theta, 2)}
    expected[4] = hand_bema(rec.theta, 4)
    assert_reference_log_probs(captured, expected, bema_run["initial_base"])


def test_frozen_base_weights_are_bit_identical(bema_run):
    after = base_weights(bema_run["model"])
    assert after.keys() == bema_run["base_before"].keys() and len(after) > 0
    for name, before in bema_run["base_before"].items():
        assert torch.equal(after[name], before), name


# ------------------------------------------------------------------------------------ TR-DPO
@pytest.mark.parametrize("alpha", [0.4, 1.0], ids=["soft", "hard"])
def test_tr_dpo_mixup_every_sync_steps(tmp_path, tokenizer, dpo_data, alpha):
    """ref ← α·θ + (1 − α)·ref every ref_model_sync_steps = 2 steps (TRL's SyncRefModelCallback rule)."""
    model, _ = lora_policy(tokenizer)
    reference = AveragedReferenceCallback("tr_dpo", ref_model_sync_steps=2, ref_model_mixup_alpha=alpha)
    recorder = Recorder(model)
    trainer = DPOTrainer(
        model=model,
        args=dpo_args(tmp_path, max_steps=4),
        train_dataset=dpo_data[0],
        processing_class=tokenizer,
        callbacks=[reference, recorder],
    )
    trainer.train()
    for t in range(1, 5):
        if t % 2 == 0:
            assert not all_equal(recorder.ref[t], recorder.ref[t - 1])
        else:
            assert all_equal(recorder.ref[t], recorder.ref[t - 1])
        expected = oracles.tr_dpo(recorder.theta, ref_model_sync_steps=2, ref_model_mixup_alpha=alpha, at=t)
        assert_close(recorder.ref[t], [x.float() for x in expected])
    if alpha == 1.0:  # the hard update keeps no averager state and copies θ exactly
        assert reference.weights is None and reference.memory_bytes() == 0
        assert all_equal(recorder.ref[4], recorder.theta[4])


# ------------------------------------------------------------------------- feature off = TRL
@pytest.mark.parametrize("route", ["peft_model", "peft_config"])
def test_never_syncing_equals_plain_trl_dpo(tmp_path, tokenizer, dpo_data, route):
    """With the callback attached but never syncing, losses and weights equal a plain TRL DPO run.

    ``peft_model``: TRL adds the "ref" adapter itself; ``peft_config``: TRL's reference is the base model with
    adapters disabled, and the callback adds "ref" (LoRA B = 0) at train begin.
    """

    def run(callbacks, out):
        model, base = lora_policy(tokenizer)
        kwargs = {"model": model} if route == "peft_model" else {"model": base, "peft_config": LoraConfig(**LORA)}
        if route == "peft_config":
            torch.manual_seed(1)  # same LoRA init as lora_policy
        trainer = DPOTrainer(
            args=dpo_args(tmp_path / out, max_steps=4),
            train_dataset=dpo_data[0],
            processing_class=tokenizer,
            callbacks=callbacks,
            **kwargs,
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return trainer.model, losses

    plain_model, plain_losses = run([], "plain")
    reference = AveragedReferenceCallback("ema", decay=0.5, update_every=1, ref_update_every=100)
    with pytest.warns(UserWarning, match="reference will never move"):
        ours_model, our_losses = run([reference], "ours")
    assert reference.weights is not None and reference.weights.averager.num_updates == 4  # it did average
    assert len(our_losses) == 4 and our_losses == plain_losses
    assert all_equal(adapter_values(ours_model, "default"), adapter_values(plain_model, "default"))
    assert "ref" in ours_model.peft_config


# --------------------------------------------------------------------------------- refusals
def test_precompute_ref_log_probs_is_refused(tmp_path, tokenizer, dpo_data):
    model, _ = lora_policy(tokenizer)
    trainer = DPOTrainer(
        model=model,
        args=dpo_args(tmp_path, max_steps=1, precompute_ref_log_probs=True),
        train_dataset=dpo_data[0].select(range(4)),
        processing_class=tokenizer,
        callbacks=[AveragedReferenceCallback("ema", decay=0.5)],
    )
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        attach(trainer)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        trainer.train()  # standalone callback, no attach()


def test_warns_when_the_averager_never_updates(tmp_path, tokenizer, dpo_data):
    """BEMA's default update_every is TRL's 400: in a short run every sync would write θ_0."""
    model, _ = lora_policy(tokenizer)
    trainer = DPOTrainer(
        model=model,
        args=dpo_args(tmp_path, max_steps=2),
        train_dataset=dpo_data[0],
        processing_class=tokenizer,
        callbacks=[AveragedReferenceCallback("bema", ref_update_every=1)],
    )
    with pytest.warns(UserWarning, match="averager will never update"):
        trainer.train()


def test_sync_ref_model_is_refused(tmp_path, tokenizer):
    model, _ = lora_policy(tokenizer)
    args = dpo_args(tmp_path, sync_ref_model=True)
    callback = AveragedReferenceCallback("ema", decay=0.5)
    from transformers import TrainerControl, TrainerState

    with pytest.raises(ValueError, match="sync_ref_model=True"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_plain_model_is_refused(tmp_path, tokenizer):
    from transformers import TrainerControl, TrainerState

    callback = AveragedReferenceCallback("ema", decay=0.5)
    with pytest.raises(ValueError, match="needs a PEFT"):
        callback.on_train_begin(dpo_args(tmp_path), TrainerState(), TrainerControl(), model=tiny_llama(tokenizer))


def test_add_reference_adapter_is_a_frozen_copy_and_idempotent(tokenizer):
    base = tiny_llama(tokenizer)
    before = base_weights(base)
    model = add_reference_adapter(base, LoraConfig(**LORA))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n:
                p.add_(0.01)  # a non-trivial policy adapter
    add_reference_adapter(model)  # "ref" exists: no change
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    fresh = add_reference_adapter(get_peft_model(tiny_llama(tokenizer), LoraConfig(**LORA)))
    assert all_equal(adapter_values(fresh, "ref"), adapter_values(fresh, "default"))
    assert not all_equal(adapter_values(model, "ref"), adapter_values(model, "default"))
    assert all(
        torch.equal(p, before[n.removeprefix("base_model.model.").replace(".base_layer", "")])
        for n, p in base_weights(model).items()
    )
    with pytest.raises(ValueError, match="peft_config"):
        add_reference_adapter(tiny_llama(tokenizer))


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nope"}, "allowed: .*tr_dpo"),
        ({"method": "bema", "ref_model_mixup_alpha": 0.5}, "applies only to method='tr_dpo'"),
        ({"method": "tr_dpo", "decay": 0.9}, "decay=0.9: does not apply to method='tr_dpo'"),
        ({"method": "tr_dpo", "ref_update_every": 3}, "ref_update_every=3: does not apply to method='tr_dpo'"),
        ({"method": "ema", "ema_power": 0.3}, "ema_power"),
        ({"method": "tr_dpo", "ref_model_mixup_alpha": 1.5}, "ref_model_mixup_alpha"),
        (
            {"method": "tr_dpo", "ref_model_mixup_alpha": 1.0, "offload": True},
            "offload=True, .*no averager state to offload",
        ),
        ({"method": "ema", "update_every": 2, "update_freq": 2}, "update_freq"),
    ],
)
def test_config_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOReferenceConfig(**kwargs)


def test_config_cadences():
    tr_dpo = DPOReferenceConfig(method="tr_dpo")  # TRL DPOConfig defaults
    assert (tr_dpo.sync_every, tr_dpo.mixup_alpha) == (512, 0.6)
    spec = DPOReferenceConfig(method="tr_dpo", ref_model_sync_steps=8, ref_model_mixup_alpha=0.25).averager_spec()
    assert (spec.method, spec.decay, spec.cadence, spec.update_after) == ("ema", 0.75, 8, 0)
    assert DPOReferenceConfig(method="tr_dpo", ref_model_mixup_alpha=1.0).averager_spec() is None
    bema = DPOReferenceConfig(method="bema", update_freq=4, update_after=6, ref_update_every=5)
    assert bema.averager_spec().cadence == 4 and bema.sync_every == 5
    assert [s for s in range(1, 21) if bema.is_sync_step(s)] == [10, 15, 20]
    assert bema.first_sync_step() == 10
    assert DPOReferenceConfig(method="ema", decay=0.9).sync_every == 1  # defaults to the averager's cadence


# ------------------------------------------------------------------------------- resume
def test_resume_restores_reference_and_averager(tmp_path, tokenizer, dpo_data):
    """Stop at step 2 (checkpoint), resume to 4: policy, reference and averager equal the uninterrupted run's.

    transformers 5.16 skips the policy adapter of a checkpoint that has adapter sub-folders (``ref/``);
    the callback restores it, so this passes on both stacks.
    """

    def trainer_for(out):
        model, _ = lora_policy(tokenizer)
        reference = AveragedReferenceCallback("bema", ref_update_every=1, **BEMA)
        recorder = Recorder(model)
        args = dpo_args(tmp_path / out, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=dpo_data[0],
            processing_class=tokenizer,
            callbacks=[reference, recorder],
        )
        return trainer, reference, recorder

    full, full_ref, full_rec = trainer_for("full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / REFERENCE_FOLDER / "averager_state.safetensors").is_file()
    assert not (checkpoint / REFERENCE_FOLDER / "adapter_model.safetensors").exists()  # not an adapter sub-folder
    loaded = PeftModel.from_pretrained(lora_policy(tokenizer)[1], str(checkpoint / "ref"))  # written by the trainer
    loaded_values = [p.detach() for n, p in loaded.named_parameters() if ".default." in n]
    assert all_equal(loaded_values, full_rec.ref[2])

    resumed, resumed_ref, resumed_rec = trainer_for("resumed")
    attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # outside its output_dir
    assert sorted(resumed.model.peft_config) == ["default", "ref"]
    assert all_equal(resumed_rec.theta[2], full_rec.theta[2]) and all_equal(resumed_rec.ref[2], full_rec.ref[2])
    assert resumed_ref.weights.averager.num_updates == full_ref.weights.averager.num_updates == 3
    for t in (3, 4):  # updates after the checkpoint continue the same average
        assert_close(resumed_rec.theta[t], full_rec.theta[t], 1e-6)
        assert_close(resumed_rec.ref[t], full_rec.ref[t], 1e-6)
        assert_close(resumed_rec.ref[t], hand_bema(full_rec.theta, t))


# ------------------------------------------------------------- weight averaging in a DPO run
def test_weight_averaging_evaluates_and_saves_in_dpo(tmp_path, tokenizer, dpo_data):
    model, initial_base = lora_policy(tokenizer)
    averaging = WeightAveragingCallback(method="ema", decay=0.5, update_every=1)
    args = dpo_args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_eval_batch_size=4,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dpo_data[0],
        eval_dataset=dpo_data[1],
        processing_class=tokenizer,
        callbacks=[averaging],
    )
    attach(trainer)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_ema_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    raw = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert raw[-1]["eval_loss"] != evals[-1]["eval_ema_loss"]
    for key in ("eval_ema_rewards/chosen", "eval_ema_rewards/margins", "eval_ema_rewards/accuracies"):
        assert key in evals[-1], sorted(evals[-1])
    assert evals[-1]["eval_ema_rewards/chosen"] != raw[-1]["eval_rewards/chosen"]
    # checkpoints hold the averaged adapter, loadable with PEFT
    for step in (2, 4):
        assert (tmp_path / f"checkpoint-{step}" / "averaged" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(initial_base), str(tmp_path / "checkpoint-4" / "averaged"))
    averaged = averaging.averaged_tensors()
    loaded_params = dict(loaded.named_parameters())
    for name, tensor in averaged.items():
        torch.testing.assert_close(loaded_params[name], tensor, atol=0, rtol=0)


# ---------------------------------------------------------------------------------- ZeRO-3
DEEPSPEED_SCRIPT = Path(__file__).parent / "deepspeed_scripts" / "dpo_reference_zero.py"


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """Two 2-rank ZeRO-3 runs: persistence threshold 0 and DeepSpeed's default."""
    pytest.importorskip("deepspeed")  # conftest points TORCH_EXTENSIONS_DIR at this version's build
    folder = tmp_path_factory.mktemp("zero3")
    # one launch per threshold: a second DeepSpeed engine in the same processes was seen to abort
    # ("terminate called without an active exception") on a loaded machine
    for persistence in ("0", "default"):
        result = launch_two_ranks(DEEPSPEED_SCRIPT, ["--persistence", persistence, "--output_dir", str(folder)])
        log = result.stdout
        assert result.returncode == 0, f"deepspeed run (threshold {persistence}) failed:\n{log[-6000:]}"
    return folder


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("persistence", ["0", "default"])
def test_zero3_reference_sync_on_two_ranks(zero3_runs, tokenizer, persistence):
    """2 ranks, ZeRO-3: "ref" is partitioned like the policy; each rank writes its partition; the reference
    forward sees it whether the LoRA tensors persist between forwards (default threshold) or not (0)."""
    spec = importlib.util.spec_from_file_location("dpo_reference_zero", DEEPSPEED_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert {k: script.REFERENCE[k] for k in BEMA} == BEMA and script.REFERENCE["ref_update_every"] == 2
    run = torch.load(zero3_runs / f"trajectory-{persistence}.pt", weights_only=False)
    assert run["world_size"] == 2 and run["layouts"] == ["Zero3Layout", "Zero3Layout"] and run["ds_partitioned"]
    assert all(run["ds_persist"]) if persistence == "default" else not any(run["ds_persist"])
    assert run["base_identical"]
    assert_two_rank_reference(run, script.MAX_STEPS, tiny_llama(tokenizer, seed=0))


def assert_two_rank_reference(run: dict, max_steps: int, initial_base) -> None:
    """A 2-rank run of ``dpo_reference_zero.run`` (ZeRO-3 or FSDP2): "ref" starts as θ_0, equals the hand BEMA of the
    gathered policy at each sync step (every 2nd) and stays put in between; each reference forward of rank 0
    equals a one-process base model + the adapter of its step."""
    theta, ref = run["theta"], run["ref"]
    assert sorted(theta) == list(range(max_steps + 1)) and all_equal(ref[0], theta[0])
    for t in range(1, max_steps + 1):
        if t % 2 == 0:
            assert not all_equal(ref[t], ref[t - 1]), f"reference did not move at sync step {t}"
            assert_close(ref[t], hand_bema(theta, t))
        else:
            assert all_equal(ref[t], ref[t - 1]), f"reference moved at step {t}"
    captured = run["captured"]
    assert [step for step, *_ in captured] == [0, 1, 2, 3]
    expected = {0: theta[0], 1: theta[0], 2: hand_bema(theta, 2), 3: hand_bema(theta, 2)}
    assert_reference_log_probs(captured, expected, initial_base)
