"""Weight averaging under PyTorch FSDP2 (``fully_shard``): real 2-rank runs on CPU (gloo, torchrun).

``tests/fsdp_scripts/fsdp2_loop.py`` trains the tiny Llama sharded with ``fully_shard`` in a plain
loop and drives ``AveragedWeights`` over the layout ``build_layout`` picks (BEMA + EMA with
non-default settings), three ways: LoRA with ``reshard_after_forward=True``; LoRA with
``reshard_after_forward=False`` and ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``;
full fine-tuning with ``reshard_after_forward=False``. The LoRA model has rank 3 (rank 1 on
``q_proj``), so FSDP2 splits the LoRA A rows 2/1 and 1/0 (an empty shard on rank 1).

The real trainers run with accelerate's FSDP2 plugin (its CPU gate lifted by
``fsdp_scripts/accelerate_cpu_fsdp.py``): ``sft_fsdp2.py`` (SFTTrainer: averages, checkpoints, the
averaged evaluation, resume 2 → 2 and 2 → 1 ranks), ``dpo_reference_fsdp2.py`` (DPOTrainer with the moving
``"ref"`` adapter) and ``distill_fsdp2.py`` (self-distillation against its 1-process twin); the last two
reuse the ZeRO runs of ``deepspeed_scripts/``.

The oracle is a float64 hand average (tests/oracles.py) of the trajectory gathered with DTensor's own
``full_tensor()``; the store computes in fp32, so they agree to fp32 rounding (≤ 1e-6 here; a misplaced
row moves an element by > 1e-3).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import oracles
import pytest
import torch
from conftest import launch_two_ranks
from torch import nn

from trl_ema_plugin.config import AveragerSpec
from trl_ema_plugin.integrations.parallel import build_layout
from trl_ema_plugin.shadow import AveragedWeights, LocalLayout, trainable_parameters

SCRIPTS = Path(__file__).parent / "fsdp_scripts"
#: fp32 store vs float64 oracle: a few fp32 roundings per update on values of size ≤ 1
ORACLE_ATOL = 1e-6

RUNS = {
    "lora_reshard": [],
    "lora_keep_unsharded_bf16": ["--no-reshard", "--bf16"],
    "full_keep_unsharded": ["--full", "--no-reshard"],
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(script: str, args: list[str], processes: int = 2):
    """``torchrun --nproc_per_node 2 script args`` (gloo on CPU), relaunched once if a rank is lost."""
    return launch_two_ranks(SCRIPTS / script, args, launcher="torchrun", processes=processes)


@pytest.fixture(scope="module")
def loop():
    return _load("fsdp2_loop")


@pytest.fixture(scope="module", params=list(RUNS), ids=list(RUNS))
def run(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    result = launch("fsdp2_loop.py", ["--output_dir", str(folder), *RUNS[request.param]])
    assert result.returncode == 0 and (folder / "report.json").is_file(), f"fsdp2 run failed:\n{result.stdout[-8000:]}"
    data = torch.load(folder / "trajectory.pt", weights_only=False)
    return {"name": request.param, "dir": folder, "report": json.loads((folder / "report.json").read_text()), **data}


# ----------------------------------------------------------------------------- hand averages (float64)
def hand_average(spec: dict, trajectory: dict, last: int, start: dict | None = None) -> dict[str, torch.Tensor]:
    """The float64 oracle of ``spec`` (tests/oracles.py) at step ``last``; ``start``: the saved state to resume from."""
    return oracles.averaged(trajectory, spec, at=last, resume=start)


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, atol=ORACLE_ATOL, rtol=0.0, msg=f"{what}: {name}")


def state_of(saved: dict[str, torch.Tensor], buffer: str) -> dict[str, torch.Tensor]:
    prefix = f"{buffer}/"
    return {k[len(prefix) :]: v.double() for k, v in saved.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------- tests
slow = pytest.mark.slow


@slow
def test_each_rank_averages_its_fsdp2_rows(run, loop):
    ranks = run["report"]["ranks"]
    assert [r["layout"] for r in ranks] == ["Fsdp2Layout"] * 2
    full_numel = ranks[0]["full_numel"]
    assert sum(r["local_numel"] for r in ranks) == full_numel  # no padding is stored
    row_numels = run["report"]["row_numels"]
    for name, rows in ranks[0]["local_rows"].items():  # torch.chunk's rule: ⌈rows/2⌉ on rank 0, the rest on rank 1
        total = run["trajectory"][0][name].shape[0]
        assert rows == [0, (total + 1) // 2] and ranks[1]["local_rows"][name] == [(total + 1) // 2, total], name
    if not run["report"]["full"]:  # the uneven cases really happen: 2/1 rows and an empty shard
        lora_a = {n: r for n, r in ranks[1]["local_rows"].items() if "lora_A" in n}
        assert {hi - lo for lo, hi in lora_a.values()} == {0, 1}
    for spec in loop.AVERAGERS:
        name = spec.get("name", spec["method"])
        buffers = len(run["report"]["buffers"][name])
        per_rank = [r["shadow_bytes"][name] for r in ranks]
        assert sum(per_rank) == 4 * buffers * full_numel  # fp32, each buffer once over the ranks
        # each rank holds ⌈rows/2⌉ or ⌊rows/2⌋ rows of every tensor: at most half a row away from 1/2
        bound = 4 * buffers * sum(row_numels.values()) / 2
        assert all(abs(b - sum(per_rank) / 2) <= bound for b in per_rank), (per_rank, bound)


@slow
def test_averages_equal_the_float64_hand_average_of_the_gathered_trajectory(run, loop):
    trajectory = run["trajectory"]
    assert sorted(trajectory) == list(range(loop.STEPS + 1))
    for step in (loop.SAVE_STEP, loop.STEPS):
        for spec in loop.AVERAGERS:
            name = spec.get("name", spec["method"])
            assert_matches(run[f"average_{step}"][name], hand_average(spec, trajectory, step), f"{name} at {step}")
    moved = max(
        (run[f"average_{loop.STEPS}"]["ema"][n].double() - w).abs().max() for n, w in trajectory[loop.STEPS].items()
    )
    assert moved > 1e-3  # the average is not the raw weights


@slow
def test_the_per_step_path_calls_no_collective(run):
    for rank in run["report"]["ranks"]:
        assert rank["collectives_in_steps"] == 0, rank
        assert rank["collectives_in_one_save"] >= 1, "the counter sees the saving gather"


@slow
def test_mixed_precision_averages_the_fp32_sharded_parameters(run):
    ranks = run["report"]["ranks"]
    assert {r["sharded_dtype"] for r in ranks} == {"torch.float32"}
    expected_forward = "torch.bfloat16" if run["report"]["bf16"] else "torch.float32"
    assert {d for r in ranks for d in r["forward_dtypes"]} == {expected_forward}


@slow
def test_eval_swap_reaches_the_forward_and_restores_exactly(run, loop):
    losses = run["report"]["losses"]
    assert losses["after"] == losses["raw"]  # the forward after the swap sees the raw weights again
    for name, value in run["trajectory"][loop.STEPS].items():
        assert torch.equal(run["after_swap"][name], value), name
        assert torch.equal(run["under_swap"][name], run[f"average_{loop.STEPS}"]["bema"][name].double()), name
    # the forward under the swap saw the averaged weights: one process, the same model with the averages loaded
    reference = one_process_loss(loop, run, run[f"average_{loop.STEPS}"]["bema"])
    raw = one_process_loss(loop, run, {n: w.float() for n, w in run["trajectory"][loop.STEPS].items()})
    assert losses["bema"] != losses["raw"]
    tolerance = 1e-6 * reference  # measured: equal (0.0) in all three runs, bf16 included
    assert abs(losses["bema"] - reference) <= tolerance, (losses, reference, raw)
    assert abs(losses["raw"] - raw) <= tolerance, (losses, reference, raw)


@slow
def test_self_distillation_teacher_is_sharded_and_its_forward_sees_the_average(run):
    """The teacher adapter exists before fully_shard, so FSDP2 shards it like the policy adapter; a refresh writes
    each rank's rows and the next forward run as the teacher equals the forward under the BEMA swap."""
    if run["report"]["full"]:
        pytest.skip("the teacher is a PEFT adapter: LoRA runs only")
    ranks = run["report"]["ranks"]
    assert [r["teacher_layout"] for r in ranks] == ["Fsdp2Layout"] * 2
    # fp32 shards of the twin adapter (with param_dtype=bf16 too: that casts only the compute copy)
    assert [r["teacher_bytes"] for r in ranks] == [4 * r["local_numel"] for r in ranks]
    losses = run["report"]["losses"]
    assert losses["teacher"] == pytest.approx(losses["bema"], rel=1e-6) and losses["teacher"] != losses["raw"]


def one_process_loss(loop, run, weights: dict[str, torch.Tensor]) -> float:
    model = loop.lora_model(run["report"]["full"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if run["report"]["bf16"]:  # FSDP2's param_dtype casts the parameters only; buffers (RoPE) stay fp32
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return loop.eval_loss(model)


@slow
def test_export_from_the_sharded_model_loads_as_the_averaged_weights(run, loop):
    """PEFT: adapter_model.safetensors that PeftModel.from_pretrained loads; full fine-tuning: model.safetensors
    (the state dict holds DTensor shards, so the gathered averages are written) that from_pretrained loads."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    expected = run[f"average_{loop.STEPS}"]["bema"]
    folder = run["dir"] / "averaged"
    if run["report"]["full"]:
        loaded = LlamaForCausalLM.from_pretrained(str(folder))
    else:
        loaded = PeftModel.from_pretrained(loop.lora_model(full=True), str(folder))
    params = dict(loaded.named_parameters())
    for name, value in expected.items():
        assert torch.equal(params[name].detach(), value), name


@slow
def test_resume_on_one_process_from_the_two_rank_state(run, loop):
    """2 → 1 ranks: the saved full state loads into a LocalLayout; continuing from step SAVE_STEP with the
    recorded θ_t gives the 2-rank averages of the last step exactly (fp32 elementwise, same order)."""
    model = loop.lora_model(run["report"]["full"])
    named = trainable_parameters(model)
    layout = build_layout(named, args=None, model=model)
    assert isinstance(layout, LocalLayout)
    params = dict(named)
    for spec_dict in loop.AVERAGERS:
        spec = AveragerSpec(**spec_dict)
        weights = AveragedWeights(spec, layout)
        weights.load_state(run[f"state_{loop.SAVE_STEP}"][spec.label], run[f"metadata_{loop.SAVE_STEP}"][spec.label])
        for t in range(loop.SAVE_STEP + 1, loop.STEPS + 1):
            with torch.no_grad():
                for name, value in run["trajectory"][t].items():
                    params[name].copy_(value)
            assert weights.step(t)
        got = weights.averaged_tensors(loop.STEPS)
        for name, value in run[f"average_{loop.STEPS}"][spec.label].items():
            assert torch.equal(got[name], value), f"{spec.label}: {name}"
    # and the same layout on 2 ranks reloads each rank's buffers bit for bit (2 → 2)
    assert all(all(r["reloaded_equal"].values()) for r in run["report"]["ranks"])


@slow
def test_fsdp1_unsupported_shardings_and_a_late_ref_adapter_are_refused(tmp_path):
    result = launch("fsdp_refusals.py", ["--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-8000:]
    found = json.loads((tmp_path / "refusals.json").read_text())
    for case in ("fsdp1_nested", "fsdp1_root_only"):
        assert found[case] is not None and "FSDP1" in found[case] and "fsdp_version: 2" in found[case], case
    assert "_fsdp_wrapped_module" in found["fsdp1_nested"]
    assert "FullyShardedDataParallel wrapper around PeftModel" in found["fsdp1_root_only"]
    # FSDP1 really flattens: the LoRA A (3 × 64) is a 192-element view on rank 0 and empty on rank 1
    assert [shapes[0][1] for shapes in found["fsdp1_shapes"]] == [[192], [0]]
    assert found["shard_dim1"] is not None and "Shard(dim=1)" in found["shard_dim1"]
    refused = found["reference_added_after_sharding"]
    assert refused is not None and "under FSDP2 it must exist before the model is sharded" in refused
    assert found["reference_adapters"] == ["default"]  # nothing was added


@pytest.mark.parametrize("config", [{"fsdp_version": 1}, {"version": 1}])
def test_fsdp1_requested_in_training_arguments_is_refused(config, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True, fsdp_config=config, report_to=[])
    with pytest.raises(ValueError, match=r"does not support FSDP1.*fsdp_version: 2"):
        build_layout(trainable_parameters(nn.Linear(2, 2)), args)
    # FSDP2 asked for, but the parameters are not sharded (accelerate on CPU trains with DDP): the usual layout
    args2 = SimpleNamespace(fsdp=True, fsdp_config={"version": 2})
    assert isinstance(build_layout(trainable_parameters(nn.Linear(2, 2)), args2), LocalLayout)


# ------------------------------------------------------------------- the real trainer (accelerate FSDP2)
@pytest.fixture(scope="module")
def sft():
    return _load("sft_fsdp2")


def _trainer_run(folder: Path, *args: str, processes: int = 2) -> dict:
    result = launch("sft_fsdp2.py", ["--output_dir", str(folder), *args], processes)
    log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)
    assert result.returncode == 0 and (folder / "report.json").is_file(), f"trainer run failed:\n{log[-8000:]}"
    data = torch.load(folder / "trajectory.pt", weights_only=False)
    return {"dir": folder, "report": json.loads((folder / "report.json").read_text()), **data}


STATE_DICT_TYPES = ["FULL_STATE_DICT", "SHARDED_STATE_DICT"]


@pytest.fixture(scope="module", params=STATE_DICT_TYPES, ids=["full_state_dict", "sharded_state_dict"])
def trainer_run(request, tmp_path_factory):
    """SFTTrainer + accelerate's FSDP2 plugin, reshard_after_forward=False (the case where a forward leaves
    the unsharded parameters allocated), LoRA rank 3; the trainer checkpoints in either state-dict type."""
    folder = tmp_path_factory.mktemp(f"sft_fsdp2_{request.param}")
    run = _trainer_run(folder, "--no-reshard", "--state_dict_type", request.param)
    run["state_dict_type"] = request.param
    return run


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def peft_key(name: str) -> str:
    return name.replace(".default.", ".")


def assert_adapter_matches(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    written = adapter(folder)
    assert set(written) == {peft_key(n) for n in expected}, folder
    for name, value in expected.items():
        torch.testing.assert_close(written[peft_key(name)].double(), value, atol=ORACLE_ATOL, rtol=0.0, msg=name)


@slow
def test_trainer_callback_sees_fsdp2_and_keeps_half_the_shadow_per_rank(trainer_run, sft):
    ranks = trainer_run["report"]["ranks"]
    assert [r["layout"] for r in ranks] == ["Fsdp2Layout"] * 2
    for rank in ranks:
        assert rank["seen"] == {
            "model": "FSDPPeftModelForCausalLM", "trainable_is_dtensor": True, "args_fsdp": True,
            "fsdp_config_version": 2, "plugin_fsdp_version": 2,
            "state_dict_type": f"StateDictType.{trainer_run['state_dict_type']}",
        }  # fmt: skip
        assert rank["wrapped"] == "FSDPPeftModelForCausalLM"  # FSDP2 wraps in place: model is model_wrapped
    full = ranks[0]["full_numel"]
    assert sum(r["local_numel"] for r in ranks) == full
    for name, buffers in trainer_run["report"]["buffers"].items():
        per_rank = [r["shadow_bytes"][name] for r in ranks]
        assert sum(per_rank) == 4 * len(buffers) * full
        assert all(0.3 < b / sum(per_rank) < 0.7 for b in per_rank), per_rank  # LoRA A rows 2/1: 58/42 here


@slow
def test_trainer_writes_the_hand_average_and_communicates_only_when_saving(trainer_run, sft):
    trajectory = trainer_run["trajectory"]
    assert sorted(trajectory) == list(range(sft.MAX_STEPS + 1))
    out = trainer_run["dir"]
    bema, ema = sft.AVERAGERS
    for step, folder in ((sft.SAVE_STEPS, out / f"checkpoint-{sft.SAVE_STEPS}"), (sft.MAX_STEPS, out)):
        assert_adapter_matches(folder / "averaged", hand_average(bema, trajectory, step))
        assert_adapter_matches(folder / "averaged-ema", hand_average(ema, trajectory, step))
    ranks = trainer_run["report"]["ranks"]
    assert [r["collectives_in_step_hooks"] for r in ranks] == [0, 0]
    saves = sft.MAX_STEPS // sft.SAVE_STEPS + 1
    assert [r["writes"] for r in ranks] == [saves * 2, 0]  # two averagers, rank 0 only
    # the trainer's own FSDP2 checkpoint, beside our folders
    own = "pytorch_model_fsdp.bin" if trainer_run["state_dict_type"] == "FULL_STATE_DICT" else "pytorch_model_fsdp_0"
    files = trainer_run["report"]["checkpoint_files"][f"checkpoint-{sft.SAVE_STEPS}"]
    assert {own, "averaged", "averaged-ema"} <= set(files)


@slow
def test_trainer_eval_swap_evaluates_the_average_and_restores_the_raw_adapter(trainer_run, sft, tmp_path):
    logs = {k: v for e in trainer_run["report"]["log_history"] for k, v in e.items() if k.startswith("eval_")}
    assert logs["eval_bema_loss"] != logs["eval_loss"]
    expected = one_process_eval_loss(sft, trainer_run["dir"] / "averaged", tmp_path)
    assert logs["eval_bema_loss"] == pytest.approx(expected, rel=1e-5)
    # right after the averaged evaluation every rank holds the raw weights again, bit for bit
    for name, value in trainer_run["trajectory"][sft.MAX_STEPS].items():
        assert torch.equal(trainer_run["after_eval"][sft.MAX_STEPS][name], value), name


def one_process_eval_loss(sft, adapter_folder: Path, tmp_path: Path) -> float:
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = PeftModel.from_pretrained(tiny_llama(tokenizer, seed=0), str(adapter_folder))
    args = SFTConfig(
        output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=sft.EVAL_BATCH, use_cpu=True, bf16=False,
        max_length=48, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    data = tiny_sft_dataset(8, seed=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    return trainer.evaluate()["eval_loss"]


@slow
@pytest.mark.parametrize("processes", [2, 1], ids=["2_to_2_ranks", "2_to_1_rank"])
def test_trainer_resumes_its_fsdp2_checkpoint_with_the_averages(trainer_run, sft, tmp_path, processes):
    """2 → 2 and 2 → 1 ranks through resume_from_checkpoint: the trainer restores its FSDP2 checkpoint, the callback
    the averager state (every rank its rows: on 1 rank, all of them); steps 4..6 continue the hand average from the
    saved state. One process is a 1-rank FSDP2 run (torchrun, one process): transformers refuses an FSDP checkpoint
    in a run without FSDP ("is only supported when using PyTorch FSDP"), and DCP reshards SHARDED_STATE_DICT."""
    from importlib.metadata import version

    from packaging.version import Version
    from safetensors.torch import load_file

    if trainer_run["state_dict_type"] == "FULL_STATE_DICT" and Version(version("accelerate")) < Version("1.15"):
        pytest.skip(
            "accelerate < 1.15 with FSDP2 + PEFT + FULL_STATE_DICT saves only rank 0's adapter shard in "
            "pytorch_model_fsdp.bin (save_fsdp_model(adapter_only=True), fixed by huggingface/accelerate#4206): the "
            "trainer's own resume leaves rank 1's rows at θ_0, also without this plugin; SHARDED_STATE_DICT resumes exactly"
        )
    checkpoint = trainer_run["dir"] / f"checkpoint-{sft.SAVE_STEPS}"
    resumed = _trainer_run(
        tmp_path / "resumed", "--no-reshard", "--state_dict_type", trainer_run["state_dict_type"],
        "--resume_from", str(checkpoint), processes=processes,
    )  # fmt: skip
    ranks = resumed["report"]["ranks"]
    assert [r["layout"] for r in ranks] == ["Fsdp2Layout"] * processes
    assert sum(r["local_numel"] for r in ranks) == ranks[0]["full_numel"]
    trajectory = resumed["trajectory"]
    assert sorted(trajectory) == list(range(sft.SAVE_STEPS, sft.MAX_STEPS + 1))
    for step in range(sft.SAVE_STEPS, sft.MAX_STEPS + 1):  # the trainer restored θ_3 and trained on as without a break
        for name, value in trainer_run["trajectory"][step].items():
            if processes == 2 or step == sft.SAVE_STEPS:
                assert torch.equal(trajectory[step][name], value), f"step {step}: {name}"
            else:  # one batch of 4 instead of two of 2 with averaged gradients: fp32 rounding (measured ≤ 2.2e-7)
                torch.testing.assert_close(trajectory[step][name], value, atol=2e-6, rtol=0, msg=name)
    bema, ema = sft.AVERAGERS
    for spec, folder in ((bema, "averaged"), (ema, "averaged-ema")):
        name = spec.get("name", spec["method"])
        saved = load_file(str(checkpoint / folder / "averager_state.safetensors"))
        restored = resumed["state_at_begin"][name]
        assert set(restored) == set(saved) and all(torch.equal(restored[k], saved[k]) for k in saved), name
        buffers = ("ema", "theta0") if spec["method"] == "bema" else ("ema",)
        start = {"step": sft.SAVE_STEPS, **{b: state_of(saved, b) for b in buffers}}
        assert_adapter_matches(tmp_path / "resumed" / folder, hand_average(spec, trajectory, sft.MAX_STEPS, start))


# ------------------------------------------------------------- the moving DPO reference (accelerate FSDP2)
@pytest.fixture(scope="module", params=[[], ["--no-reshard"]], ids=["reshard", "keep_unsharded"])
def dpo_run(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo_fsdp2")
    result = launch("dpo_reference_fsdp2.py", ["--output_dir", str(folder), *request.param])
    log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)
    assert result.returncode == 0 and (folder / "trajectory.pt").is_file(), f"DPO run failed:\n{log[-8000:]}"
    return torch.load(folder / "trajectory.pt", weights_only=False)


@slow
def test_dpo_reference_is_sharded_and_follows_the_hand_bema_under_fsdp2(dpo_run, tokenizer):
    """DPOTrainer + accelerate's FSDP2 plugin, 2 ranks: "ref" is sharded like the policy (DTensors, Fsdp2Layout);
    at each sync step it equals the float64 BEMA of the gathered policy trajectory and stays put in between;
    every reference forward the trainer ran equals a one-process base model + that adapter."""
    import dpo_reference_zero as script  # the ZeRO-3 run's settings and recorder; deepspeed_scripts is on sys.path
    from test_dpo_reference import BEMA, assert_two_rank_reference

    from trl_ema_plugin.demos.tiny import tiny_llama

    assert {k: script.REFERENCE[k] for k in BEMA} == BEMA and script.REFERENCE["ref_update_every"] == 2
    assert dpo_run["world_size"] == 2 and dpo_run["layouts"] == ["Fsdp2Layout", "Fsdp2Layout"]
    assert dpo_run["dtensors"] and dpo_run["base_identical"]
    assert_two_rank_reference(dpo_run, script.MAX_STEPS, tiny_llama(tokenizer, seed=0))


# ---------------------------------------------------------------- self-distillation (accelerate FSDP2)
@pytest.fixture(scope="module")
def distill_single(tmp_path_factory):
    """The 1-process twin: same model, data, global batch and order, no FSDP."""
    import distill_zero  # tests/deepspeed_scripts is on sys.path

    return distill_zero.run(str(tmp_path_factory.mktemp("distill_single")))


@slow
@pytest.mark.parametrize("options", [[], ["--no-reshard"]], ids=["reshard", "keep_unsharded"])
def test_self_distillation_under_fsdp2_matches_one_process(options, distill_single, tmp_path):
    """SFTTrainer + accelerate's FSDP2 plugin, 2 ranks: the teacher adapter is sharded like the policy (each rank
    holds half of its bytes); the teacher starts from random LoRA weights, so the term is 0 at step 0 only if every
    rank's rows of the average reached it; the logged terms equal the one-process run's."""
    result = launch("distill_fsdp2.py", ["--output_dir", str(tmp_path), *options])
    log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)
    assert result.returncode == 0 and (tmp_path / "report.json").is_file(), f"distillation run failed:\n{log[-8000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layout"] == "Fsdp2Layout" and distill_single["layout"] == "LocalLayout"
    assert report["teacher_forwards"] == 3
    assert report["teacher_bytes"] == distill_single["teacher_bytes"] // 2  # rank 0's rows: every LoRA dim is even
    distill = report["loss/distill"]
    assert distill[0] == 0.0 and all(value > 1e-5 for value in distill[1:])
    # the same global batch in the same order, gradients reduce-scattered: fp32 rounding (measured ≤ 8.4e-5 relative)
    assert distill == pytest.approx(distill_single["loss/distill"], rel=5e-4, abs=1e-9)
    assert report["loss/task"] == pytest.approx(distill_single["loss/task"], rel=1e-5)
    total = [task + term for task, term in zip(report["loss/task"], distill, strict=True)]
    assert report["loss"] == pytest.approx(total, rel=1e-5)
