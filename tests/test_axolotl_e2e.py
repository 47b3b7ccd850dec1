"""``axolotl train`` for real, on CPU, with the plugin: SFT + LoRA + BEMA, ``rl: dpo``, ``rl: grpo`` (a reward
function module by dotted path, on-policy self-distillation) and ``rl: kto`` with a BEMA reference and a BEMA
average, ZeRO-3 on 2 processes, SFT + LoRA recording post-hoc EMA snapshots, a bad key, and ``axolotl
ema-export``. The configs are the CPU twins in ``example_configs/cpu/``, run as written in a folder that holds a tiny Llama and local jsonl data.

Every run saves a checkpoint per step, so the test rebuilds BEMA by hand from the recorded
adapters θ_1..θ_T and compares it with the ``averaged/`` adapter the plugin wrote:

    θ̂_T = α_T·(θ_T − θ_τ) + EMA_T,   EMA_t = (1 − β_t)·EMA_{t−1} + β_t·θ_t,   EMA_τ = θ_τ
    β_t = (ρ + t)^−κ,   α_t = (ρ + t)^−η          (γ = 1, β_min = 0, update every step)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip(
    "axolotl", reason="could not import 'axolotl': the Axolotl end-to-end tests run on the axolotl stack only"
)

import oracles
from cpu_launch import free_port
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from experiments.axolotl_cpu import MODEL_FOLDER, prepare_cpu_workspace
from trl_ema_plugin.config.flat_keys import weight_averaging_config_from_flat

pytestmark = [pytest.mark.axolotl, pytest.mark.slow]

CPU_CONFIGS = Path(__file__).resolve().parents[1] / "example_configs" / "cpu"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return prepare_cpu_workspace(tmp_path_factory.mktemp("axolotl"))


def axolotl(*args: str, cwd: Path, timeout: int = 480, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        "DS_ACCELERATOR": "cpu",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        [str(BIN / "axolotl"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if expect_ok:
        assert result.returncode == 0, f"axolotl {' '.join(args)} failed:\n{failure_summary(result)}"
    return result


def failure_summary(result: subprocess.CompletedProcess) -> str:
    """The first error lines of every rank (the crashing rank's error is not the last output) and the tail."""
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "Error" in line and "Warning" not in line][:20]
    return "\n".join(errors) + "\n...\n" + output[-4000:]


def lora_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}


def adapter_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    """θ_step: the checkpoint's adapter; under ZeRO-3 (where that file is empty) the DeepSpeed fp32 weights."""
    checkpoint = run / f"checkpoint-{step}"
    saved = load_file(checkpoint / "adapter_model.safetensors")
    if all(t.numel() > 0 for t in saved.values()):
        return saved
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return lora_only(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)))


def hand_bema(run: Path, cfg: dict, last: int) -> dict[str, torch.Tensor]:
    """The oracle's BEMA (float64) of the primary averager's settings over the recorded adapters θ_τ..θ_last."""
    spec = weight_averaging_config_from_flat(cfg).primary
    assert spec.method == "bema" and spec.cadence == 1 and spec.multiplier == 1.0 and spec.min_ema_multiplier == 0.0
    trajectory = {t: adapter_at(run, t) for t in range(spec.update_after, last + 1)}
    return oracles.bema(
        trajectory, update_after=spec.update_after, lag=spec.lag, ema_power=spec.ema_power,
        bias_power=spec.bias_power, at=last,
    )  # fmt: skip


def assert_matches_hand_bema(run: Path, cfg: dict, folder: Path, step: int) -> None:
    averaged = load_file(folder / "adapter_model.safetensors")
    expected = hand_bema(run, cfg, step)
    assert averaged.keys() == expected.keys() and len(averaged) == 28  # 7 linears x 2 layers x (A, B)
    for key, tensor in averaged.items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=1e-5, atol=1e-7)
    state = json.loads((folder / "averager_state.json").read_text())
    assert state["global_step"] == step
    assert state["counters"]["num_updates"] == step - cfg["weight_averaging_update_after"]


def assert_loads_with_peft_and_differs(workspace: Path, folder: Path, raw: dict[str, torch.Tensor]) -> None:
    base = AutoModelForCausalLM.from_pretrained(workspace / MODEL_FOLDER)
    model = PeftModel.from_pretrained(base, folder)
    loaded = lora_only(model.state_dict())
    averaged = load_file(folder / "adapter_model.safetensors")
    assert loaded.keys() == averaged.keys() == raw.keys()
    assert all(torch.equal(loaded[k], averaged[k]) for k in averaged)
    assert all(not torch.allclose(averaged[k], raw[k]) for k in averaged if raw[k].abs().sum() > 0)


def test_sft_lora_bema_ema_export_and_resume(workspace):
    config = CPU_CONFIGS / "sft_lora_bema.yml"
    cfg = yaml.safe_load(config.read_text())
    axolotl("train", str(config), cwd=workspace)
    run = workspace / cfg["output_dir"]

    # the final averaged adapter, and the one in a middle checkpoint, are BEMA of the recorded trajectory
    assert_matches_hand_bema(run, cfg, run / "averaged", cfg["max_steps"])
    assert_matches_hand_bema(run, cfg, run / "checkpoint-3" / "averaged", 3)
    assert_loads_with_peft_and_differs(workspace, run / "averaged", load_file(run / "adapter_model.safetensors"))

    # evaluation of the averaged weights, beside the raw eval_loss (trainer attached: full metrics)
    history = json.loads((run / f"checkpoint-{cfg['max_steps']}" / "trainer_state.json").read_text())["log_history"]
    raw = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    averaged = {h["step"]: h["eval_bema_loss"] for h in history if "eval_bema_loss" in h}
    assert averaged.keys() == raw.keys() and {3, 6} <= raw.keys()
    if 0 in raw:  # Axolotl evaluates before the first step: BEMA has not started, the average is θ itself
        assert averaged[0] == pytest.approx(raw[0], rel=1e-6)
    assert averaged[6] != pytest.approx(raw[6], rel=1e-6)

    # axolotl ema-export: merge the averaged adapter into the base model
    axolotl("ema-export", str(config), "--merge", cwd=workspace)
    merged = AutoModelForCausalLM.from_pretrained(run / "ema-merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(workspace / MODEL_FOLDER).state_dict()
    adapter = load_file(run / "averaged" / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["lora_r"]
    for key in (k for k in adapter if ".lora_A." in k):
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        expected = base[f"{module}.weight"] + scale * adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6)

    # resume from an explicit checkpoint path (Axolotl's resume_from_checkpoint -> trainer.train(...) -> attach):
    # steps 4-6 run again; BEMA continues from the saved state, so the result is BEMA over θ_1..θ_3 (first run)
    # and θ_4..θ_6 (resumed run), never a restart at step 3
    resume = workspace / "resume.yml"
    resume.write_text(yaml.safe_dump({**cfg, "resume_from_checkpoint": str(run / "checkpoint-3")}))
    axolotl("train", str(resume), cwd=workspace)
    assert_matches_hand_bema(run, cfg, run / "averaged", cfg["max_steps"])
    counters = json.loads((run / "averaged" / "averager_state.json").read_text())["counters"]
    assert counters == {
        "started_at": 1, "num_updates": 5, "last_update_step": 6, "skipped_updates": 0, "last_skipped_step": None
    }  # fmt: skip


def test_sft_self_distillation_from_the_bema_teacher(workspace):
    config = CPU_CONFIGS / "sft_lora_bema_self_distill.yml"
    cfg = yaml.safe_load(config.read_text())
    axolotl("train", str(config), cwd=workspace)
    run = workspace / cfg["output_dir"]
    history = json.loads((run / f"checkpoint-{cfg['max_steps']}" / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, cfg["max_steps"] + 1))
    warmup = cfg["self_distillation_warmup_steps"]
    for h in steps:  # log step s is global_step s - 1 during the forward
        assert h["loss"] == pytest.approx(h["loss/task"] + h["loss/distill"], abs=2e-5)
        if h["step"] - 1 < warmup:
            assert h["loss/distill"] == 0.0
        else:
            assert h["loss/distill"] > 0.0
    # the averaged adapter is still BEMA of the (distilled) trajectory; the teacher adapter is not exported
    assert_matches_hand_bema(run, cfg, run / "averaged", cfg["max_steps"])


def test_sft_lora_posthoc_ema_snapshots_and_export(workspace):
    """``posthoc_ema`` keys alone (no online averager): the snapshots hold the power EMAs of the recorded adapters
    θ_1..θ_6 (the checkpoints), and ``axolotl ema-export --posthoc-sigma-rel`` writes the synthesized adapter."""
    from trl_ema_plugin.posthoc import list_snapshots, read_theta0, synthesize
    from trl_ema_plugin.posthoc.snapshots import THETA, profile_name

    config = CPU_CONFIGS / "sft_lora_posthoc_ema.yml"
    cfg = yaml.safe_load(config.read_text())
    axolotl("train", str(config), cwd=workspace)
    run = workspace / cfg["output_dir"]
    start, last = cfg["posthoc_ema_update_after"], cfg["max_steps"]
    trajectory = {t: adapter_at(run, t) for t in range(start, last + 1)}
    assert not (run / "averaged").exists()
    snapshots = list_snapshots(run)
    assert [s.global_step for s in snapshots] == [3, 5, 6]

    def stored(path: Path, buffer: str) -> dict[str, torch.Tensor]:
        return {
            k.split("/", 1)[1].replace(".default", ""): v
            for k, v in load_file(path).items()
            if k.startswith(f"{buffer}/")
        }

    assert all(torch.equal(v, trajectory[start][k]) for k, v in stored(read_theta0(run).path, THETA).items())
    for snapshot in snapshots:
        for sigma_rel in cfg["posthoc_ema_sigma_rels"]:
            ema = stored(snapshot.path, profile_name(sigma_rel))
            hand = oracles.power_ema(trajectory, sigma_rel=sigma_rel, update_after=start, at=snapshot.global_step)
            assert ema.keys() == hand.keys() and len(ema) == 28  # 7 linears x 2 layers x (A, B)
            for key, tensor in ema.items():
                torch.testing.assert_close(tensor.double(), hand[key], rtol=1e-6, atol=1e-7)

    axolotl("ema-export", str(config), "--posthoc-sigma-rel", "0.07", cwd=workspace)
    exported = run / "ema-posthoc"
    expected = {k.replace(".default", ""): v for k, v in synthesize(run, 0.07).items()}
    written = load_file(exported / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    assert_loads_with_peft_and_differs(workspace, exported, trajectory[last])


def reference_is_the_averaged_policy(cfg: dict) -> None:
    """The example's reference runs the same BEMA as its averaged policy and is written every step."""
    same = ("update_every", "update_after", "lag", "ema_power")
    assert all(cfg[f"rl_reference_{k}"] == cfg[f"weight_averaging_{k}"] for k in same)
    assert cfg["rl_reference"] == cfg["weight_averaging"] == "bema" and cfg["rl_reference_ref_update_every"] == 1


def assert_reference_is_hand_bema(run: Path, cfg: dict, step: int, at: int) -> None:
    """``checkpoint-step/ref/`` (the trainer's "ref" adapter, saved by PEFT) is the hand BEMA of θ_τ..θ_at, and the
    plugin's ``checkpoint-step/reference/`` state says it was written at step ``at``."""
    reference = load_file(run / f"checkpoint-{step}" / "ref" / "adapter_model.safetensors")
    expected = hand_bema(run, cfg, at)
    assert reference.keys() == expected.keys() and len(reference) == 28
    for key, tensor in reference.items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=1e-5, atol=1e-7)
    state = json.loads((run / f"checkpoint-{step}" / "reference" / "averager_state.json").read_text())
    assert state["last_sync_step"] == at and state["global_step"] == step


def test_dpo_bema(workspace):
    config = CPU_CONFIGS / "dpo_bema.yml"
    cfg = yaml.safe_load(config.read_text())
    assert cfg["rl"] == "dpo"
    axolotl("train", str(config), cwd=workspace)
    run = workspace / cfg["output_dir"]
    assert_matches_hand_bema(run, cfg, run / "averaged", cfg["max_steps"])
    assert_loads_with_peft_and_differs(workspace, run / "averaged", load_file(run / "adapter_model.safetensors"))

    # rl_reference_* (the same BEMA, synced every step): the trainer's "ref" adapter in each checkpoint
    # equals the averaged policy of that step, and the starting policy θ_τ at step τ
    reference_is_the_averaged_policy(cfg)
    for step in range(cfg["rl_reference_update_after"], cfg["max_steps"] + 1):
        reference = load_file(run / f"checkpoint-{step}" / "ref" / "adapter_model.safetensors")
        averaged = load_file(run / f"checkpoint-{step}" / "averaged" / "adapter_model.safetensors")
        assert reference.keys() == averaged.keys()
        for key in averaged:
            torch.testing.assert_close(reference[key], averaged[key], rtol=0, atol=1e-7)
    state = json.loads((run / f"checkpoint-{cfg['max_steps']}" / "reference" / "averager_state.json").read_text())
    assert state["last_sync_step"] == cfg["max_steps"]


def test_grpo_bema_reference_averaging_and_self_distillation(workspace):
    """``rl: grpo`` with the reward function named by dotted path (``trl.reward_funcs``): GRPO reads the reference
    once per generation batch (here one per step), so the "ref" adapter saved at step N is the BEMA of step N − 1,
    written right before the batch that trained step N; the averaged policy is the BEMA of step N."""
    config = CPU_CONFIGS / "grpo_bema.yml"
    cfg = yaml.safe_load(config.read_text())
    assert cfg["rl"] == "grpo" and cfg["trl"]["reward_funcs"] == ["trl_ema_plugin.demos.tiny.letters_reward"]
    assert cfg["micro_batch_size"] == cfg["trl"]["num_generations"] and cfg["gradient_accumulation_steps"] == 1
    reference_is_the_averaged_policy(cfg)
    axolotl("train", str(config), cwd=workspace)
    run, last = workspace / cfg["output_dir"], cfg["max_steps"]

    assert_matches_hand_bema(run, cfg, run / "averaged", last)
    assert_matches_hand_bema(run, cfg, run / "checkpoint-2" / "averaged", 2)
    assert_loads_with_peft_and_differs(workspace, run / "averaged", load_file(run / "adapter_model.safetensors"))
    # step 1 trained against the initial adapter (a fresh LoRA: B = 0, the base model); no write yet
    first = load_file(run / "checkpoint-1" / "ref" / "adapter_model.safetensors")
    assert all(not t.any() for k, t in first.items() if "lora_B" in k) and all(
        t.any() for k, t in first.items() if "lora_A" in k
    )
    state = json.loads((run / "checkpoint-1" / "reference" / "averager_state.json").read_text())
    assert state["last_sync_step"] is None
    for step in range(cfg["rl_reference_update_after"] + 1, last + 1):
        assert_reference_is_hand_bema(run, cfg, step, at=step - 1)

    # the reward function ran (TRL logs it by name), the KL term read the moving reference, and the
    # self-distillation term joined the loss after its warm-up
    history = json.loads((run / f"checkpoint-{last}" / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, last + 1))
    assert all("rewards/letters_reward/mean" in h and h["kl"] >= 0 for h in steps)
    assert any(h["kl"] > 0 for h in steps)
    # log step s is global_step s − 1 during the forward. No teacher before the warm-up; at global_step τ
    # (update_after) the BEMA teacher is θ_τ, the student itself (term exactly 0); after it they differ
    warmup, start = cfg["self_distillation_warmup_steps"], cfg["weight_averaging_update_after"]
    assert warmup <= start
    for h in steps:
        assert h["loss"] == pytest.approx(h["loss/task"] + h["loss/distill"], abs=2e-5)
        assert (h["loss/distill"] > 0.0) == (h["step"] - 1 > start)


def test_kto_bema_reference_and_averaging(workspace):
    """``rl: kto`` reads the reference on every batch: the "ref" adapter saved at step N is the BEMA of step N."""
    config = CPU_CONFIGS / "kto_bema.yml"
    cfg = yaml.safe_load(config.read_text())
    assert cfg["rl"] == "kto"
    reference_is_the_averaged_policy(cfg)
    axolotl("train", str(config), cwd=workspace)
    run, last = workspace / cfg["output_dir"], cfg["max_steps"]
    assert_matches_hand_bema(run, cfg, run / "averaged", last)
    assert_loads_with_peft_and_differs(workspace, run / "averaged", load_file(run / "adapter_model.safetensors"))
    for step in range(cfg["rl_reference_update_after"], last + 1):
        assert_reference_is_hand_bema(run, cfg, step, at=step)
    history = json.loads((run / f"checkpoint-{last}" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, last + 1))


def test_zero3_two_processes_bema(workspace):
    config = CPU_CONFIGS / "zero3_lora_bema.yml"
    cfg = yaml.safe_load(config.read_text())
    launcher = ["--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port"]
    result = axolotl("train", str(config), *launcher, str(free_port()), cwd=workspace, timeout=560, expect_ok=False)
    if result.returncode != 0 and "Connection closed by peer" in result.stdout + result.stderr:
        # DeepSpeed 0.18.9's CPU all-gather occasionally drops a rank under heavy load (seen once in a
        # full suite run, never alone); one more launch, and the error of both if it fails again
        warnings.warn(f"ZeRO-3 launch failed once, retrying:\n{failure_summary(result)}", stacklevel=1)
        shutil.rmtree(workspace / cfg["output_dir"], ignore_errors=True)
        result = axolotl("train", str(config), *launcher, str(free_port()), cwd=workspace, timeout=560, expect_ok=False)
    assert result.returncode == 0, f"axolotl ZeRO-3 run failed:\n{failure_summary(result)}"
    run = workspace / cfg["output_dir"]
    # gathered from both ranks' shards, written once, equal to BEMA of the DeepSpeed fp32 trajectory
    assert_matches_hand_bema(run, cfg, run / "averaged", cfg["max_steps"])
    assert_loads_with_peft_and_differs(workspace, run / "averaged", adapter_at(run, cfg["max_steps"]))


def test_bad_key_fails_validation_with_our_message(workspace):
    cfg = yaml.safe_load((CPU_CONFIGS / "sft_lora_bema.yml").read_text())
    lag = cfg.pop("weight_averaging_lag")
    cases = [
        (  # EMA's decay, set on BEMA
            {**cfg, "weight_averaging_lag": lag, "weight_averaging_decay": 0.9},
            "weight_averaging_decay=0.9: does not apply to weight_averaging='bema' (allowed: "
            "weight_averaging_bias_horizon, weight_averaging_bias_power, weight_averaging_ema_power, weight_averaging_lag",
        ),
        (  # misspelled: Axolotl drops keys it does not know, and the run would train with the default lag
            {**cfg, "weight_averagin_lag": lag},
            f"weight_averagin_lag={lag}: unknown key (did you mean weight_averaging_lag?)",
        ),
    ]
    for bad_cfg, message in cases:
        bad = workspace / "bad.yml"
        bad.write_text(yaml.safe_dump({**bad_cfg, "output_dir": "./outputs/never"}))
        result = axolotl("train", str(bad), cwd=workspace, timeout=240, expect_ok=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert message in output, output[-3000:]
        assert not (workspace / "outputs" / "never").exists()
