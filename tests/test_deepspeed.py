"""Weight averaging under DeepSpeed ZeRO-2 and ZeRO-3: real 2-process runs on this CPU machine.

Each 2-rank run is ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/deepspeed_scripts/sft_zero.py``
(SFTTrainer + LoRA on the tiny Llama, BEMA primary + EMA, checkpoints at steps 3 and 6, an
averaged evaluation at step 6). ZeRO-3 runs twice: with ``stage3_param_persistence_threshold`` 0
(``p.data`` empty between forwards) and at DeepSpeed's default (every LoRA tensor persisted, full
``p.data`` kept). The 1-process twin trains on the same global batch in the same order
(``train_sampling_strategy="sequential"``, per-device batch 2 × 2 ranks = 4).
"""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import version
from pathlib import Path

import oracles
import pytest
import torch
from conftest import launch_two_ranks
from packaging.version import Version
from safetensors.torch import load_file

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install 'trl-ema-plugin[deepspeed]')", allow_module_level=True)

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "deepspeed_scripts" / "sft_zero.py"
MAX_STEPS, SAVE_STEPS = 6, 3
#: 2 ranks vs 1 process: gradients are summed in another order, so the weights agree to float
#: tolerance only. Adam divides by √v + ε, so an element whose gradient is near ε moves by up to ~lr
#: in either run. Measured after 6 steps at lr 2e-2: mean |Δ| 1e-8 (latest stack) to 8e-8 (axolotl
#: stack), max |Δ| 5e-6 to 2.1e-5 (1 to 111 of 8192 elements above 1e-6). Tolerance: max |Δ| ≤
#: 5e-3·lr = 1e-4 and mean |Δ| ≤ 3e-7; a wrong batch or a misplaced slice moves the mean by > 1e-4.
TWIN_ATOL = 1e-4
TWIN_MEAN = 3e-7

RUNS = {
    "zero2": (2, "default"),
    "zero3_persist0": (3, "0"),
    "zero3_default": (3, "default"),
}


def _script():
    spec = importlib.util.spec_from_file_location("sft_zero", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_run(folder: Path) -> dict:
    data = torch.load(folder / "trajectory.pt", weights_only=False)
    return {"dir": folder, "report": json.loads((folder / "report.json").read_text()), **data}


@pytest.fixture(scope="module")
def sft_zero():
    return _script()


@pytest.fixture(scope="module")
def single(tmp_path_factory, sft_zero):
    folder = tmp_path_factory.mktemp("single")
    sft_zero.run(str(folder), zero=None, max_steps=MAX_STEPS)
    return _load_run(folder)


@pytest.fixture(scope="module", params=list(RUNS), ids=list(RUNS))
def two_ranks(request, tmp_path_factory):
    stage, persistence = RUNS[request.param]
    if stage < 3 and Version(version("deepspeed")) < Version("0.19"):
        pytest.skip(
            "DeepSpeed 0.18.x: the ZeRO-1/2 optimizer step itself fails on CPU/gloo with torch 2.13 "
            "('Output 0 of Split is a view and is being modified inplace' in all_gather_dp_groups), "
            "also in a plain SFTTrainer run without this plugin; covered on the latest stack (deepspeed 0.19)"
        )
    folder = tmp_path_factory.mktemp(request.param)
    args = [
        "--zero",
        str(stage),
        "--persistence",
        persistence,
        "--output_dir",
        str(folder),
        "--max_steps",
        str(MAX_STEPS),
    ]
    result = launch_two_ranks(SCRIPT, args)
    (folder / "launcher.log").write_text(result.stdout)
    log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)  # no progress bars
    assert result.returncode == 0 and (folder / "report.json").is_file(), f"deepspeed run failed:\n{log[-8000:]}"
    run = _load_run(folder)
    run.update(name=request.param, stage=stage, persistence=persistence)
    return run


# ----------------------------------------------------------------------------- hand averages
def peft_key(name: str) -> str:
    """Parameter name → key in adapter_model.safetensors (PEFT drops the adapter name)."""
    return name.replace(".default.", ".")


def hand(method: str, trajectory: dict, last: int, start: dict | None = None) -> dict[str, torch.Tensor]:
    """The oracle of sft_zero.AVERAGERS' ``method`` at step ``last``, in fp32 and in the store's order of operations
    (so it must match bit for bit); ``start``: the saved state to continue from (``{"step", "theta0", "ema"}``)."""
    spec = next(spec for spec in _script().AVERAGERS if spec["method"] == method)
    return oracles.averaged(trajectory, spec, at=last, resume=start, dtype=torch.float32)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_adapter_equals(folder: Path, expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    written = adapter(folder)
    assert set(written) == {peft_key(n) for n in expected}
    for name, value in expected.items():
        got = written[peft_key(name)]
        if atol == 0.0:
            assert torch.equal(got, value), f"{folder.name}: {name} differs by {(got - value).abs().max():.3g}"
        else:
            torch.testing.assert_close(got, value, atol=atol, rtol=0.0, msg=f"{folder.name}: {name}")


# ------------------------------------------------------------------------------------- tests
def test_layout_follows_zero_stage_and_halves_shadow_memory(two_ranks, single):
    ranks = two_ranks["report"]["ranks"]
    expected_layout = "Zero3Layout" if two_ranks["stage"] == 3 else "SlicedLayout"
    assert [r["layout"] for r in ranks] == [expected_layout] * 2
    assert single["report"]["ranks"][0]["layout"] == "LocalLayout"
    if two_ranks["stage"] == 3:  # both ZeRO-3 cases really happen
        persisted = {flag for r in ranks for flag in r["persisted"]}
        assert persisted == ({False} if two_ranks["persistence"] == "0" else {True})
    for name, full in single["report"]["ranks"][0]["shadow_bytes"].items():
        per_rank = [r["shadow_bytes"][name] for r in ranks]
        assert sum(per_rank) == full  # partitions never store padding
        for value in per_rank:
            assert abs(value - full / 2) <= 0.02 * full, f"{name}: {per_rank} bytes per rank vs {full} in one process"


def test_averaged_adapter_is_exactly_the_hand_average_of_the_gathered_trajectory(two_ranks):
    trajectory = two_ranks["trajectory"]
    assert sorted(trajectory) == list(range(MAX_STEPS + 1))
    out = two_ranks["dir"]
    for step, folder in ((SAVE_STEPS, out / f"checkpoint-{SAVE_STEPS}"), (MAX_STEPS, out)):
        assert_adapter_equals(folder / "averaged", hand("bema", trajectory, step))
        assert_adapter_equals(folder / "averaged-ema", hand("ema", trajectory, step))
    # and the average really moved away from the raw weights
    raw = {peft_key(n): w for n, w in trajectory[MAX_STEPS].items()}
    written = adapter(out / "averaged-ema")
    assert max((written[k] - raw[k]).abs().max() for k in raw) > 1e-3


def assert_twins(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(expected), what
    diff = torch.cat([(got[k] - expected[k]).abs().flatten() for k in expected])
    assert diff.max() <= TWIN_ATOL and diff.mean() <= TWIN_MEAN, f"{what}: max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_two_ranks_match_the_one_process_twin(two_ranks, single):
    for step in range(MAX_STEPS + 1):
        assert_twins(two_ranks["trajectory"][step], single["trajectory"][step], f"weights at step {step}")
    for folder in ("averaged", "averaged-ema"):
        assert_twins(adapter(two_ranks["dir"] / folder), adapter(single["dir"] / folder), folder)
        configs = [json.loads((run["dir"] / folder / "adapter_config.json").read_text()) for run in (two_ranks, single)]
        for config in configs:  # a set in PEFT: its order in the json varies between processes
            config["target_modules"] = sorted(config["target_modules"])
        assert configs[0] == configs[1]


def test_eval_swap_uses_averaged_weights_and_restores_them_exactly(two_ranks, tmp_path):
    # restored: the weights gathered right after the averaged evaluation are the raw weights, bit for bit
    after = two_ranks["after_eval"][MAX_STEPS]
    for name, value in two_ranks["trajectory"][MAX_STEPS].items():
        assert torch.equal(after[name], value), name
    logs = {k: v for entry in two_ranks["report"]["log_history"] for k, v in entry.items() if k.startswith("eval_")}
    assert logs["eval_bema_loss"] != logs["eval_loss"] and logs["eval_ema_loss"] != logs["eval_loss"]
    # the forward really saw the averaged weights: one process, base model + exported adapter, same batches
    assert logs["eval_bema_loss"] == pytest.approx(_eval_loss_of(two_ranks["dir"] / "averaged", tmp_path), rel=1e-5)
    assert logs["eval_ema_loss"] == pytest.approx(_eval_loss_of(two_ranks["dir"] / "averaged-ema", tmp_path), rel=1e-5)


def _eval_loss_of(adapter_folder: Path, tmp_path: Path) -> float:
    from ds_common import cpu_training_args
    from peft import PeftModel
    from trl import SFTTrainer

    from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

    module = _script()
    tokenizer = tiny_tokenizer()
    model = PeftModel.from_pretrained(tiny_llama(tokenizer, seed=0), str(adapter_folder))
    args = cpu_training_args(str(tmp_path / "eval"), per_device_eval_batch_size=module.EVAL_BATCH, max_length=48)
    data = tiny_sft_dataset(8, seed=1)  # SFTTrainer requires a train_dataset; it is not trained on
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    return trainer.evaluate()["eval_loss"]


def test_rank_zero_writes_once_per_save_and_nothing_is_gathered_per_step(two_ranks):
    ranks = two_ranks["report"]["ranks"]
    saves = MAX_STEPS // SAVE_STEPS + 1  # checkpoints + the final export
    averagers = two_ranks["report"]["buffers"]
    assert [r["writes"] for r in ranks] == [saves * len(averagers), 0]
    gathers_per_save = sum(1 + len(buffers) for buffers in averagers.values())  # average + each state buffer
    assert [r["gathers"] for r in ranks] == [saves * gathers_per_save] * 2
    assert [r["gathers_in_steps"] for r in ranks] == [0, 0]
    leftovers = [p.name for p in two_ranks["dir"].rglob(".averaged*")]
    assert leftovers == []


def test_resume_on_one_process_from_a_two_rank_checkpoint(two_ranks, sft_zero, tmp_path):
    checkpoint = two_ranks["dir"] / f"checkpoint-{SAVE_STEPS}"
    out = tmp_path / "resumed"
    sft_zero.run(str(out), zero=None, resume_from=str(checkpoint), max_steps=MAX_STEPS)
    resumed = _load_run(out)
    assert resumed["report"]["ranks"][0]["layout"] == "LocalLayout"
    saved = {name: load_file(str(checkpoint / folder / "averager_state.safetensors"))
             for name, folder in (("bema", "averaged"), ("ema", "averaged-ema"))}  # fmt: skip
    for name, tensors in saved.items():
        restored = resumed["state_at_begin"][name]
        assert set(restored) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(restored[key], value), f"{name}: {key} not restored"
    # updates after the checkpoint continue from the restored state (steps 4..6 of the resumed run)
    trajectory = resumed["trajectory"]
    assert sorted(trajectory) == list(range(SAVE_STEPS, MAX_STEPS + 1))

    def state(name: str, buffer: str) -> dict[str, torch.Tensor]:
        prefix = f"{buffer}/"
        return {k[len(prefix) :]: v for k, v in saved[name].items() if k.startswith(prefix)}

    bema_start = {"step": SAVE_STEPS, "theta0": state("bema", "theta0"), "ema": state("bema", "ema")}
    assert_adapter_equals(out / "averaged", hand("bema", trajectory, MAX_STEPS, start=bema_start))
    ema_start = {"step": SAVE_STEPS, "ema": state("ema", "ema")}
    assert_adapter_equals(out / "averaged-ema", hand("ema", trajectory, MAX_STEPS, start=ema_start))


def test_full_finetune_under_zero3_writes_the_averaged_model(tmp_path):
    """No PEFT: every parameter is partitioned; saving gathers the averages once and writes a full model
    (``model.safetensors`` + config) that ``from_pretrained`` loads, equal to the hand average."""
    folder = tmp_path / "full"
    args = ["--zero", "3", "--persistence", "0", "--output_dir", str(folder), "--max_steps", str(SAVE_STEPS), "--full"]
    result = launch_two_ranks(SCRIPT, args)
    assert result.returncode == 0 and (folder / "report.json").is_file(), (
        f"deepspeed run failed:\n{result.stdout[-8000:]}"
    )
    run = _load_run(folder)
    assert [r["layout"] for r in run["report"]["ranks"]] == ["Zero3Layout"] * 2
    expected = hand("bema", run["trajectory"], SAVE_STEPS)
    assert "model.embed_tokens.weight" in expected and "lm_head.weight" in expected  # not an adapter
    for where in (folder / f"checkpoint-{SAVE_STEPS}" / "averaged", folder / "averaged"):
        written = load_file(str(where / "model.safetensors"))
        assert set(written) == set(expected)
        for name, value in expected.items():
            assert torch.equal(written[name], value), f"{where}: {name}"
    from transformers import LlamaForCausalLM

    loaded = dict(LlamaForCausalLM.from_pretrained(str(folder / "averaged")).named_parameters())
    for name, value in expected.items():
        assert torch.equal(loaded[name].detach(), value), name
