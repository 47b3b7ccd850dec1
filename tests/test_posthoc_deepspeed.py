"""Post-hoc EMA under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU ranks: the snapshots are those of one process.

Each 2-rank run is ``deepspeed --num_gpus 2 tests/deepspeed_scripts/posthoc_zero.py`` (sft_zero.py's model, LoRA,
data and global batch; σ_rel 0.05 and 0.10 from step 1, snapshots at steps 3, 5 and 6, a checkpoint at step 3).
ZeRO-3 runs with ``stage3_param_persistence_threshold`` 0 and at DeepSpeed's default; the FSDP2 run is the same
script under accelerate's FSDP2 plugin (``torchrun``, tests/fsdp_scripts/posthoc_fsdp2.py). The snapshots must hold
the power-function EMAs of the run's own gathered trajectory (to float rounding), agree with the 1-process twin
(at test_deepspeed.py's twin tolerance), be gathered only at snapshot and checkpoint steps and be written by rank 0
alone; a 2-rank checkpoint resumes in one process (under FSDP2: a 1-rank FSDP2 run, since transformers refuses
an FSDP checkpoint in a run without FSDP).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
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

import posthoc_zero  # tests/deepspeed_scripts is on sys.path (conftest)
from test_deepspeed import RUNS, _load_run, assert_twins

from trl_ema_plugin.posthoc import list_snapshots, read_theta0

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "deepspeed_scripts" / "posthoc_zero.py"
FSDP2_SCRIPT = Path(__file__).parent / "fsdp_scripts" / "posthoc_fsdp2.py"
#: the layout each engine's run must pick
LAYOUTS = {
    "zero2": "SlicedLayout",
    "zero3_persist0": "Zero3Layout",
    "zero3_default": "Zero3Layout",
    "fsdp2": "Fsdp2Layout",
}
MAX_STEPS = 6
SNAPSHOTS = [3, 5, 6]
SIGMA_RELS = (0.05, 0.10)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = tmp_path_factory.mktemp("posthoc_single")
    posthoc_zero.run(str(folder), zero=None, max_steps=MAX_STEPS)
    return _load_run(folder)


def _launch(folder: Path, engine: str, *args: str, processes: int = 2) -> dict:
    if engine == "fsdp2":
        result = launch_two_ranks(
            FSDP2_SCRIPT, ["--output_dir", str(folder), *args], launcher="torchrun", processes=processes
        )
    else:
        stage, persistence = RUNS[engine]
        result = launch_two_ranks(
            SCRIPT, ["--zero", str(stage), "--persistence", persistence, "--output_dir", str(folder), *args]
        )
    log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)
    assert result.returncode == 0 and (folder / "report.json").is_file(), f"{engine} run failed:\n{log[-8000:]}"
    return _load_run(folder)


@pytest.fixture(scope="module", params=[*RUNS, "fsdp2"])
def two_ranks(request, tmp_path_factory):
    if request.param in RUNS and RUNS[request.param][0] < 3 and Version(version("deepspeed")) < Version("0.19"):
        pytest.skip("DeepSpeed 0.18.x: the ZeRO-1/2 optimizer step itself fails on CPU/gloo (see test_deepspeed.py)")
    folder = tmp_path_factory.mktemp(f"posthoc_{request.param}")
    return {**_launch(folder, request.param, "--max_steps", str(MAX_STEPS)), "name": request.param}


def snapshot_tensors(run: dict, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run["dir"] / "posthoc" / f"snapshot-{step:08d}.safetensors"))


def buffer(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}/")}


def test_snapshots_hold_the_power_emas_of_the_gathered_trajectory(two_ranks):
    trajectory = two_ranks["trajectory"]
    assert [s.global_step for s in list_snapshots(two_ranks["dir"])] == SNAPSHOTS
    theta0 = buffer(load_file(str(read_theta0(two_ranks["dir"]).path)), "theta")
    assert all(torch.equal(theta0[n], trajectory[1][n]) for n in trajectory[1])
    for step in SNAPSHOTS:
        tensors = snapshot_tensors(two_ranks, step)
        theta = buffer(tensors, "theta")
        assert set(theta) == set(trajectory[step])
        assert all(torch.equal(theta[n], trajectory[step][n]) for n in theta), f"θ at step {step}"
        for sigma_rel in SIGMA_RELS:
            stored = buffer(tensors, f"sigma_rel_{sigma_rel!r}")
            hand = oracles.power_ema(trajectory, sigma_rel=sigma_rel, update_after=1, at=step)
            for name, value in hand.items():
                torch.testing.assert_close(stored[name].double(), value, rtol=1e-6, atol=1e-7)


def test_two_ranks_write_the_snapshots_of_the_one_process_twin(two_ranks, single):
    for step in SNAPSHOTS:
        assert_twins(snapshot_tensors(two_ranks, step), snapshot_tensors(single, step), f"snapshot {step}")
    for name in ("model.json", "adapter_config.json"):
        described = [json.loads((run["dir"] / "posthoc" / name).read_text()) for run in (two_ranks, single)]
        for description in described:  # a set in PEFT: its order in the json varies between processes
            description.pop("target_modules", None)
        assert described[0] == described[1], name


def test_rank_zero_writes_and_the_emas_are_gathered_only_at_snapshots_and_checkpoints(two_ranks, single):
    ranks = two_ranks["report"]["ranks"]
    assert [r["layout"] for r in ranks] == [LAYOUTS[two_ranks["name"]]] * 2
    full = single["report"]["ranks"][0]["ema_bytes"]
    assert sum(r["ema_bytes"] for r in ranks) == full and all(
        abs(r["ema_bytes"] - full / 2) <= 0.02 * full for r in ranks
    )
    written = ["theta0.safetensors", *(f"snapshot-{s:08d}.safetensors" for s in SNAPSHOTS)]
    assert [r["writes"] for r in ranks] == [written, []]
    # θ_0 at step 1; each snapshot: one gather per EMA and one of θ; each checkpoint (3, 6): one per EMA buffer
    expected = {"1": 1, "3": 3 + 2, "5": 3, "6": 3 + 2}
    assert [r["gathers"] for r in ranks] == [expected, expected]
    assert single["report"]["ranks"][0]["gathers"] == expected


def test_resume_on_one_process_from_a_two_rank_checkpoint(two_ranks, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(two_ranks["dir"] / "posthoc", out / "posthoc")  # the run's folder, as a resumed run finds it
    checkpoint = str(two_ranks["dir"] / "checkpoint-3")
    if two_ranks["name"] == "fsdp2":
        resumed = _launch(out, "fsdp2", "--resume_from", checkpoint, "--max_steps", str(MAX_STEPS), processes=1)
        assert resumed["report"]["ranks"][0]["layout"] == "Fsdp2Layout"
    else:
        posthoc_zero.run(str(out), zero=None, resume_from=checkpoint, max_steps=MAX_STEPS)
        resumed = _load_run(out)
        assert resumed["report"]["ranks"][0]["layout"] == "LocalLayout"
    assert [s.global_step for s in list_snapshots(out)] == SNAPSHOTS
    (aside,) = [p for p in (out / "posthoc").iterdir() if p.is_dir()]
    assert sorted(p.name for p in aside.iterdir()) == ["snapshot-00000005.safetensors", "snapshot-00000006.safetensors"]
    assert snapshot_tensors(resumed, 3).keys() == snapshot_tensors(two_ranks, 3).keys()
    # the EMAs continue from the 2-rank state: the oracle from that state over the resumed trajectory (1 process
    # resumes the data at other batch boundaries, so that trajectory is not the 2-rank one)
    saved = load_file(str(two_ranks["dir"] / "checkpoint-3" / "posthoc_ema" / "averager_state.safetensors"))
    for step in (5, 6):
        tensors = snapshot_tensors(resumed, step)
        for sigma_rel in SIGMA_RELS:
            start = {"step": 3, "ema": buffer(saved, f"sigma_rel_{sigma_rel!r}/ema")}
            hand = oracles.power_ema(resumed["trajectory"], sigma_rel=sigma_rel, update_after=1, at=step, resume=start)
            for name, value in hand.items():
                torch.testing.assert_close(
                    buffer(tensors, f"sigma_rel_{sigma_rel!r}")[name].double(), value, rtol=1e-6, atol=1e-7
                )
