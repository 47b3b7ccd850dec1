"""The moving reference ("ref" adapter = averaged policy adapter) in GRPO, RLOO and KTO.

Real TRL trainers on tiny models (Llama, Qwen2) with LoRA, transformers generation, a reward computed in
code. Expectations are computed by hand (float64 BEMA) from the per-step policy weights recorded in the
same run; a probe on the model records every forward the trainer runs through the "ref" adapter.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import launch_two_ranks
from rl_helpers import (
    BEMA,
    PolicyRecorder,
    ReferenceProbe,
    all_equal,
    assert_close,
    assert_reference_log_probs,
    base_model,
    generation_trainer,
    hand_bema,
    kto_trainer,
    lora_policy,
    written_steps,
)
from transformers import TrainerControl, TrainerState
from trl import GRPOConfig, KTOConfig

from trl_ema_plugin import AveragedReferenceCallback, attach
from trl_ema_plugin.integrations.trl.reference import LEGACY_REFERENCE_FOLDERS, REFERENCE_FOLDER


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


# ------------------------------------------------------------------------ GRPO / RLOO: generation batches
CASES = {
    # kind, architecture, trainer overrides, ref_update_every, generation steps (optimizer steps done)
    # one generation per 2 optimizer steps; "ref" written at each of them (ref_update_every=1 < period 2)
    "grpo-llama-spg2": ("grpo", "llama", {"steps_per_generation": 2, "max_steps": 6}, 1, [0, 2, 4]),
    # accumulation 2, steps_per_generation 2, num_iterations 2: a generation per 2 optimizer steps; syncs every
    # 3 steps land between generations: step 3's sync is taken at the generation after step 4
    "grpo-qwen2-iterations": (
        "grpo",
        "qwen2",
        {
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 4,
            "steps_per_generation": 2,
            "num_iterations": 2,
            "max_steps": 6,
        },
        3,
        [0, 2, 4],
    ),
    # RLOO, a generation every optimizer step (TRL's default): the DPO rule, "ref" moves at steps 2 and 4
    "rloo-llama": ("rloo", "llama", {"max_steps": 5}, 2, [0, 1, 2, 3, 4]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_written_at_generation_batches(tmp_path, case):
    kind, architecture, overrides, every, generations = CASES[case]
    reference = AveragedReferenceCallback("bema", ref_update_every=every, **BEMA)
    model, initial_base = lora_policy(architecture)
    base_before = base_weights(model)
    recorder = PolicyRecorder(model)
    trainer = generation_trainer(kind, tmp_path, [reference, recorder], model=model, **overrides)
    probe = ReferenceProbe(trainer)
    attach(trainer)
    assert reference.at_generations
    trainer.train()

    theta = recorder.theta
    reads = written_steps(generations, every, BEMA["update_after"])
    assert reference.generations == [(g, reads[g]) for g in generations]  # which reference each batch used
    assert sorted(set(probe.steps)) == generations  # reference forwards happen at generation batches only
    assert any(read is not None for read in reads.values())  # the reference moved
    assert not all_equal(theta[max(theta)], theta[0])  # the policy trained
    for forward in probe.forwards:
        read = reads[forward["step"]]
        if read is None:
            assert all_equal(forward["ref"], theta[0])  # the initial adapter until the first write
        else:
            assert_close(forward["ref"], hand_bema(theta, read))  # θ̂ of the generation step, not of an older sync
            assert not all_equal(forward["ref"], theta[read])  # an average, not a copy
    moved = next(f for f in probe.forwards if reads[f["step"]] is not None)
    assert_reference_log_probs(moved, hand_bema(theta, reads[moved["step"]]), initial_base)
    after = base_weights(trainer.model)
    assert after.keys() == base_before.keys() and all(torch.equal(after[n], v) for n, v in base_before.items())


def test_tr_dpo_hard_update_in_grpo_copies_the_policy_of_the_generation_step(tmp_path):
    """method='tr_dpo', α = 1: ref ← θ_g at the first generation on or after each τ = 2 steps."""
    reference = AveragedReferenceCallback("tr_dpo", ref_model_sync_steps=2, ref_model_mixup_alpha=1.0)
    model, _ = lora_policy()
    recorder = PolicyRecorder(model)
    trainer = generation_trainer("grpo", tmp_path, [reference, recorder], model=model, max_steps=5)
    probe = ReferenceProbe(trainer)
    attach(trainer).train()
    assert reference.generations == [(0, None), (1, None), (2, 2), (3, 2), (4, 4)]
    for forward in probe.forwards:
        read = dict(reference.generations)[forward["step"]]
        assert all_equal(forward["ref"], recorder.theta[0 if read is None else read])


# ----------------------------------------------------------------------------------------- KTO
def test_kto_reference_follows_the_average_on_every_batch(tmp_path):
    """KTO reads the reference on every micro-batch (completion and KL pass): "ref" moves after sync steps 2."""
    reference = AveragedReferenceCallback("bema", ref_update_every=2, **BEMA)
    model, initial_base = lora_policy("qwen2")
    recorder = PolicyRecorder(model)
    trainer = kto_trainer(tmp_path, [reference, recorder], model=model, max_steps=4)
    probe = ReferenceProbe(trainer)
    attach(trainer).train()
    assert not reference.at_generations and reference.last_sync_step == 4
    assert sorted(set(probe.steps)) == [0, 1, 2, 3]
    theta = recorder.theta
    expected = {0: theta[0], 1: theta[0], 2: hand_bema(theta, 2), 3: hand_bema(theta, 2)}
    for forward in probe.forwards:
        assert_close(forward["ref"], expected[forward["step"]])
    assert_reference_log_probs(probe.forwards[-1], expected[3], initial_base)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_beta_zero_is_refused(tmp_path, kind):
    """No KL term, no reference forward: a moving reference would never be read."""
    trainer = generation_trainer(kind, tmp_path, [AveragedReferenceCallback("ema", decay=0.5)], beta=0.0)
    with pytest.raises(ValueError, match=r"Config\(beta=0\.0\).*set beta > 0"):
        attach(trainer)
    assert GRPOConfig(output_dir=str(tmp_path), use_cpu=True).beta == 0.0  # TRL's GRPO default


def test_generation_trainers_need_attach(tmp_path):
    trainer = generation_trainer("grpo", tmp_path, [AveragedReferenceCallback("ema", decay=0.5)])
    with pytest.raises(ValueError, match=r"GRPOTrainer computes the reference log-probs once per generation.*attach"):
        trainer.train()


def test_never_moving_reference_warns_in_grpo(tmp_path):
    """A sync at the last step is written at the next generation batch, which never comes."""
    reference = AveragedReferenceCallback("ema", decay=0.5, ref_update_every=4)
    trainer = attach(generation_trainer("grpo", tmp_path, [reference], max_steps=4))
    with pytest.warns(UserWarning, match="the reference will never move"):
        reference.check_run(trainer.args, TrainerState(max_steps=4))


def test_kto_refusals(tmp_path):
    model, _ = lora_policy()
    precomputed = kto_trainer(
        tmp_path / "pre", [AveragedReferenceCallback("ema", decay=0.5)], model=model, precompute_ref_log_probs=True
    )
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        attach(precomputed)
    with_ref_model = kto_trainer(
        tmp_path / "ref", [AveragedReferenceCallback("ema", decay=0.5)], model=lora_policy()[0], ref_model=base_model()
    )
    with pytest.raises(ValueError, match="separate ref_model"):
        attach(with_ref_model)
    callback = AveragedReferenceCallback("ema", decay=0.5)
    args = KTOConfig(output_dir=str(tmp_path), use_cpu=True, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model=True is TRL's own reference update"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=lora_policy()[0])


# -------------------------------------------------------------------------------------- resume
RESUME = {
    # kind, trainer overrides, checkpoint step (a generation boundary), folder the checkpoint holds
    "grpo": ("grpo", {"steps_per_generation": 2, "max_steps": 6}, 2, REFERENCE_FOLDER),
    "grpo-legacy-folder": ("grpo", {"steps_per_generation": 2, "max_steps": 6}, 2, LEGACY_REFERENCE_FOLDERS[0]),
    "rloo": ("rloo", {"max_steps": 5}, 3, REFERENCE_FOLDER),
    "kto": ("kto", {"max_steps": 4}, 2, REFERENCE_FOLDER),
}


def _resumable(kind: str, output_dir, overrides: dict):
    model, _ = lora_policy()
    reference = AveragedReferenceCallback("bema", ref_update_every=1, **BEMA)
    recorder = PolicyRecorder(model)
    saving = {"save_strategy": "steps", "save_steps": 1}
    if kind == "kto":
        trainer = kto_trainer(output_dir, [reference, recorder], model=model, **overrides, **saving)
    else:
        trainer = generation_trainer(kind, output_dir, [reference, recorder], model=model, **overrides, **saving)
    probe = ReferenceProbe(trainer)
    attach(trainer)
    return trainer, reference, recorder, probe


def as_written_by_the_old_code(checkpoint: Path) -> None:
    """``dpo_reference/`` with the config under the ``"dpo_reference"`` key, as versions before 0.2 wrote it."""
    old = checkpoint / LEGACY_REFERENCE_FOLDERS[0]
    (checkpoint / REFERENCE_FOLDER).rename(old)
    state = json.loads((old / "averager_state.json").read_text())
    state["dpo_reference"] = state.pop("reference")
    (old / "averager_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


@pytest.mark.parametrize("case", list(RESUME))
def test_resume_continues_the_reference(tmp_path, case):
    """Checkpoint mid-run, resume in a new output_dir: reference and averager continue the uninterrupted run,
    whose reference is BEMA (update_after=1, lag 2) of its own trajectory, with updates before and after."""
    kind, overrides, at, folder = RESUME[case]
    full, full_ref, full_rec, full_probe = _resumable(kind, tmp_path / "full", overrides)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{at}"
    assert (checkpoint / REFERENCE_FOLDER / "averager_state.safetensors").is_file()
    assert not (checkpoint / REFERENCE_FOLDER / "adapter_model.safetensors").exists()
    if folder != REFERENCE_FOLDER:
        as_written_by_the_old_code(checkpoint)

    resumed, resumed_ref, resumed_rec, resumed_probe = _resumable(kind, tmp_path / "resumed", overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(resumed.model.peft_config) == ["default", "ref"]
    assert min(resumed_probe.steps) == at and max(resumed_probe.steps) == max(full_probe.steps)
    assert resumed_ref.weights.averager.num_updates == full_ref.weights.averager.num_updates
    theta = full_rec.theta
    for t in range(at, max(theta) + 1):  # the policy continues the same trajectory (TRL restores RNG and data)
        assert_close(resumed_rec.theta[t], theta[t], atol=1e-6)
    full_by_step = {f["step"]: f["ref"] for f in full_probe.forwards}
    reads = dict(full_ref.generations) if full_ref.at_generations else {t: t for t in full_by_step}
    for forward in resumed_probe.forwards:
        step = forward["step"]
        assert_close(forward["ref"], full_by_step[step])
        assert_close(forward["ref"], hand_bema(theta, reads[step]))
    assert reads[max(reads)] > at  # updates after the checkpoint reached the reference
    if kind != "kto":
        assert resumed_ref.generations == [(g, s) for g, s in full_ref.generations if g >= at]


# ---------------------------------------------------------------------------------- ZeRO-3
DEEPSPEED_SCRIPT = Path(__file__).parent / "deepspeed_scripts" / "grpo_zero.py"


def _zero_script():
    spec = importlib.util.spec_from_file_location("grpo_zero", DEEPSPEED_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """Two 2-rank ZeRO-3 GRPO runs: persistence threshold 0 and DeepSpeed's default."""
    pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp("zero3")
    for persistence in ("0", "default"):
        result = launch_two_ranks(DEEPSPEED_SCRIPT, ["--persistence", persistence, "--output_dir", str(folder)])
        log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)
        assert result.returncode == 0, f"deepspeed GRPO run (threshold {persistence}) failed:\n{log[-8000:]}"
    shutil.rmtree(folder / "run-0", ignore_errors=True)
    shutil.rmtree(folder / "run-default", ignore_errors=True)
    return folder


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("persistence", ["0", "default"])
def test_zero3_grpo_reference_averaging_and_distillation_on_two_ranks(zero3_runs, persistence):
    """2 ranks, ZeRO-3 GRPO: the "ref" adapter, the averaged policy and the self-distillation teacher are
    partitioned like the policy; each is written shard by shard and read right, persisted or not."""
    script = _zero_script()
    run = torch.load(zero3_runs / f"trajectory-{persistence}.pt", weights_only=False)
    assert run["world_size"] == 2 and set(run["layouts"]) == {"Zero3Layout"} and run["ds_partitioned"]
    assert all(run["ds_persist"]) if persistence == "default" else not any(run["ds_persist"])
    assert run["base_identical"]
    theta = run["theta"]
    # the reference: written at the generation after steps 2 and 4 (steps_per_generation 2), read by that batch
    assert run["generations"] == [(0, None), (2, 2), (4, 4)]
    for g, read in run["generations"]:
        after = run["ref"][g + 1]  # the generation after step g runs inside step g + 1
        if read is None:
            assert all_equal(after, theta[0])
        else:
            assert_close(after, hand_bema(theta, read))
    initial_base = base_model(seed=0)
    reads = dict(run["generations"])
    assert {step for step, *_ in run["captured"]} == set(reads)  # rank 0's reference forwards: one per batch
    for step, inputs, logps, mask in run["captured"]:
        expected = theta[0] if reads[step] is None else hand_bema(theta, reads[step])
        forward = {"inputs": inputs, "logps": logps, "mask": mask}
        assert_reference_log_probs(forward, expected, initial_base)
    # the averaged policy (BEMA) and the teacher it feeds: refreshed at step t's micro-batches with θ̂_{t−1}
    averaging = script.AVERAGING
    for t in range(1 + script.WARMUP, script.MAX_STEPS + 1):
        assert_close(run["teacher"][t], hand_bema(theta, t - 1, averaging), atol=2e-6)
    assert_close(run["averaged"], hand_bema(theta, script.MAX_STEPS, averaging), atol=2e-6)
    distill = run["loss/distill"]
    assert len(distill) == script.MAX_STEPS and all(v == 0.0 for v in distill[: script.WARMUP])
    # the first distilled step: teacher = θ̂_τ = θ_τ = the student, written shard by shard: exactly 0
    assert distill[script.WARMUP] == 0.0
    assert all(v > 1e-7 for v in distill[script.WARMUP + 1 :])


def test_zero3_script_settings_are_non_default():
    script = _zero_script()
    assert {k: script.REFERENCE[k] for k in BEMA} == BEMA and script.REFERENCE["ref_update_every"] == 1
    assert script.AVERAGING["update_after"] > 0 and script.AVERAGING["lag"] != 10


def test_dpo_reference_module_still_imports():
    from trl_ema_plugin.integrations.trl import dpo_reference

    assert dpo_reference.AveragedReferenceCallback is AveragedReferenceCallback
    assert dpo_reference.REFERENCE_FOLDER == REFERENCE_FOLDER == "reference"
