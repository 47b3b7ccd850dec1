"""Self-distillation under DeepSpeed ZeRO-2 and ZeRO-3: real 2-process runs against the 1-process twin.

Each 2-rank run is ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/deepspeed_scripts/distill_zero.py``.
ZeRO-3 runs with ``stage3_param_persistence_threshold`` 0 (``p.data`` empty between forwards) and at
DeepSpeed's default (the LoRA tensors stay gathered, so the teacher must be written to both its
shard and its full ``p.data``). The teacher adapter starts from random weights: at step 0 the term
is exactly 0 only if it received the averaged weights through the sharded layout.
"""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import launch_two_ranks
from packaging.version import Version

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install 'trl-ema-plugin[deepspeed]')", allow_module_level=True)

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "deepspeed_scripts" / "distill_zero.py"
RUNS = {
    "zero3_persist0": (3, "0", "Zero3Layout"),
    "zero3_default": (3, "default", "Zero3Layout"),
    "zero2": (2, "default", "SlicedLayout"),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("distill_zero", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(str(tmp_path_factory.mktemp("single")))


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_the_single_process(name, single, tmp_path):
    stage, persistence, layout = RUNS[name]
    if stage < 3 and Version(version("deepspeed")) < Version("0.19"):
        pytest.skip("DeepSpeed 0.18.x: the ZeRO-2 optimizer step fails on CPU/gloo with torch 2.13, plugin or not")
    result = launch_two_ranks(
        SCRIPT, ["--zero", str(stage), "--persistence", persistence, "--output_dir", str(tmp_path)]
    )
    log = "\n".join(line for line in result.stdout.splitlines() if "examples/s]" not in line)
    assert result.returncode == 0 and (tmp_path / "report.json").is_file(), f"deepspeed run failed:\n{log[-8000:]}"
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["layout"] == layout and report["teacher_forwards"] == 3
    distill = report["loss/distill"]
    assert distill[0] == 0.0  # step 0: teacher = EMA start = student, written shard by shard
    assert all(value > 1e-5 for value in distill[1:])
    # the same global batch in the same order: the 1-process twin's values, to float tolerance
    assert distill == pytest.approx(single["loss/distill"], rel=2e-3, abs=1e-9)
    assert report["loss/task"] == pytest.approx(single["loss/task"], rel=1e-5)
    total = [task + term for task, term in zip(report["loss/task"], distill, strict=True)]
    assert report["loss"] == pytest.approx(total, rel=1e-5)
