"""A training process killed (SIGKILL) while a checkpoint is being saved resumes exactly.

Each case runs tests/crash_child.py, a real TRL training process that kills itself at one point of the save of
``checkpoint-4`` (or of the export at the end), or that this process kills from outside (``kill -9``) between any
two writes of that save, then trains again in a fresh process with ``trainer.train(resume_from_checkpoint=True)``. The averages it ends with are compared, bit for bit, with those
of an uninterrupted run of the same trajectory. After every kill, no checkpoint holds a temporary folder or a
state of ours that does not verify; after the resume, the stale temporary folders are gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_ema_plugin.persistence import STATE_JSON, STATE_TENSORS, read_metadata
from trl_ema_plugin.scratch import SCRATCH_FOLDER

CHILD = Path(__file__).parent / "crash_child.py"
SFT_FOLDERS = ("averaged", "averaged-bema")
DPO_FOLDER = "reference"


#: the writes of the save of checkpoint-4, in order (tests/crash_child.py PHASES): two folders of ours staged, the
#: trainer's checkpoint, ours renamed into it, the clean-up
SAVE_PHASES = (
    *("averaged-weights", "state-tensors", "state-json", "rename-staged") * 2,
    *("trainer-model", "trainer-optimizer", "trainer-rng", "trainer-state"),
    *("rename-into-checkpoint", "rename-into-checkpoint", "clean-up"),
)
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_child(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHILD), str(out), *args], capture_output=True, text=True, env=ENV, timeout=900
    )


def killed_from_outside(out: Path, phase: int) -> str:
    """Train in a child process and SIGKILL it from here while it pauses before write number ``phase`` (0-based)
    of the save of checkpoint-4; the name of that write."""
    log = out.parent / "phases.log"
    with (out.parent / "child.stderr").open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(out), "--phases", str(log), "--pause", "0.5"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=ENV,
        )  # fmt: skip
        deadline = time.monotonic() + 900
        while child.poll() is None and time.monotonic() < deadline:
            written = log.read_text().splitlines() if log.exists() else []
            if len(written) > phase:
                os.kill(child.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        else:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL, (out.parent / "child.stderr").read_text()[-3000:]
    return written[phase]


def killed(out: Path, *args: str) -> None:
    result = run_child(out, *args)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert_nothing_half_written(out)


def resumed(out: Path, *args: str) -> subprocess.CompletedProcess:
    result = run_child(out, "--resume", "true", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / SCRATCH_FOLDER).exists(), "the saves after the resume remove what the killed one left"
    assert_nothing_half_written(out)
    return result


def assert_nothing_half_written(out: Path) -> None:
    """No hidden (temporary) folder inside a checkpoint; every state folder of ours there verifies."""
    for checkpoint in out.glob("checkpoint-*"):
        for sub in checkpoint.iterdir():
            assert not sub.name.startswith("."), f"temporary folder inside a checkpoint: {sub}"
            if sub.name in (*SFT_FOLDERS, DPO_FOLDER):
                read_metadata(sub)  # raises on a missing, truncated or altered file


def assert_same_state(expected: Path, got: Path) -> None:
    """Bit-identical buffers, adapter and counters (adapter_config.json lists target_modules in set order)."""
    a, b = load_file(expected / STATE_TENSORS), load_file(got / STATE_TENSORS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    meta_a, meta_b = (json.loads((p / STATE_JSON).read_text()) for p in (expected, got))
    files_a, files_b = meta_a.pop("files"), meta_b.pop("files")
    assert meta_a == meta_b
    files_a.pop("adapter_config.json", None), files_b.pop("adapter_config.json", None)
    assert files_a == files_b  # the sha256 of the averaged adapter and of the state file


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_child(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / SCRATCH_FOLDER).exists()
    return out


@pytest.fixture(scope="module")
def uninterrupted_dpo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted_dpo") / "run"
    result = run_child(out, "--kind", "dpo")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_sft_exact(uninterrupted: Path, out: Path) -> None:
    for folder in SFT_FOLDERS:
        assert_same_state(uninterrupted / folder, out / folder)
        assert_same_state(uninterrupted / "checkpoint-6" / folder, out / "checkpoint-6" / folder)


# ------------------------------------------------------------------------------------------- SFT
def test_killed_while_staging_resumes_from_the_previous_checkpoint(tmp_path, uninterrupted):
    """Killed after the first state file of checkpoint-4 was written, before its JSON: checkpoint-4 does not exist
    yet, so the trainer resumes from checkpoint-2, whose averages are complete."""
    out = tmp_path / "run"
    killed(out, "--kill", "state-file:3")
    assert not (out / "checkpoint-4").exists()
    assert any((out / SCRATCH_FOLDER).glob("tmp-averaged-*")), "the half-written folder sits in the scratch folder"
    resumed(out)
    assert_sft_exact(uninterrupted, out)


def test_killed_between_the_trainer_checkpoint_and_ours_restores_the_staged_state(tmp_path, uninterrupted):
    """Killed when on_save begins, with save_total_limit=1: the trainer has written checkpoint-4 and deleted
    checkpoint-2; our complete state waits in the staging folder, and the resume takes it."""
    out = tmp_path / "run"
    killed(out, "--kill", "on-save:2", "--save-total-limit", "1")
    assert not (out / "checkpoint-2").exists() and not (out / "checkpoint-4" / "averaged").exists()
    result = resumed(out, "--save-total-limit", "1")
    assert "restored from that complete copy" in result.stderr
    assert_sft_exact(uninterrupted, out)


@pytest.mark.slow
def test_killed_before_the_trainer_writes_its_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "run"
    killed(out, "--kill", "trainer-save:2")
    assert not (out / "checkpoint-4").exists()
    assert (out / SCRATCH_FOLDER / "staged" / "checkpoint-4" / "averaged" / STATE_JSON).is_file()
    resumed(out)
    assert_sft_exact(uninterrupted, out)


@pytest.mark.slow
def test_killed_while_the_trainer_writes_its_checkpoint_names_the_one_to_resume_from(tmp_path, uninterrupted):
    """The trainer's own checkpoint-4 is half-written (no trainer_state.json): resume_from_checkpoint=True would load
    it, so attach() stops before training and names checkpoint-2; resuming from it is exact."""
    out = tmp_path / "run"
    killed(out, "--kill", "trainer-optimizer:2", "--attach")
    refused = run_child(out, "--resume", "true", "--attach")
    assert refused.returncode != 0
    assert f"{out / 'checkpoint-4'} is incomplete: it has no trainer_state.json" in refused.stderr
    assert f"resume from {out / 'checkpoint-2'}" in refused.stderr
    result = run_child(out, "--resume", str(out / "checkpoint-2"), "--attach")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_nothing_half_written(out)
    assert_sft_exact(uninterrupted, out)


@pytest.mark.slow
def test_killed_between_two_renames_into_the_checkpoint(tmp_path, uninterrupted):
    """averaged/ is in checkpoint-4, averaged-bema/ still staged: each folder is taken from where it is complete."""
    out = tmp_path / "run"
    killed(out, "--kill", "promote:3")
    assert (out / "checkpoint-4" / "averaged").is_dir() and not (out / "checkpoint-4" / "averaged-bema").exists()
    resumed(out)
    assert_sft_exact(uninterrupted, out)


@pytest.mark.slow
def test_killed_during_the_final_export(tmp_path, uninterrupted):
    """Killed in the export at train end (after checkpoint-6): the resume from checkpoint-6 exports again.

    transformers trains one more step when it resumes from the checkpoint of the last step, so the expected
    averages are those of the uninterrupted run resumed from its own checkpoint-6, without any kill.
    """
    out = tmp_path / "run"
    killed(out, "--kill", "state-file:7")
    assert (out / "checkpoint-6" / "averaged").is_dir() and not (out / "averaged").exists()
    resumed(out)
    expected = tmp_path / "expected"
    shutil.copytree(uninterrupted, expected)
    resumed(expected)
    for folder in SFT_FOLDERS:
        assert_same_state(uninterrupted / "checkpoint-6" / folder, out / "checkpoint-6" / folder)
        assert_same_state(expected / folder, out / folder)


@pytest.mark.slow
@pytest.mark.parametrize("phase", range(len(SAVE_PHASES)), ids=[f"{i}-{p}" for i, p in enumerate(SAVE_PHASES)])
def test_killed_from_outside_between_any_two_writes_of_a_save(tmp_path, uninterrupted, phase):
    """kill -9 from another process before each write of the save of checkpoint-4: resume_from_checkpoint=True
    resumes exactly; where the trainer's own checkpoint-4 is half-written (transformers then fails on it with its
    own error), attach() stops the resume naming checkpoint-2, and resuming from it is exact."""
    out = tmp_path / "run"
    assert killed_from_outside(out, phase) == SAVE_PHASES[phase]
    assert_nothing_half_written(out)
    result = run_child(out, "--resume", "true")
    if result.returncode != 0:
        assert SAVE_PHASES[phase] in ("trainer-optimizer", "trainer-rng", "trainer-state"), result.stderr[-3000:]
        assert not (out / "checkpoint-4" / "trainer_state.json").exists()
        refused = run_child(out, "--resume", "true", "--attach")
        assert refused.returncode != 0
        assert f"{out / 'checkpoint-4'} is incomplete" in refused.stderr
        assert f"resume from {out / 'checkpoint-2'}" in refused.stderr
        result = run_child(out, "--resume", str(out / "checkpoint-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / SCRATCH_FOLDER).exists(), "the saves after the resume remove what the killed one left"
    assert_nothing_half_written(out)
    assert_sft_exact(uninterrupted, out)


# ------------------------------------------------------------------------------------------- DPO
@pytest.mark.slow
@pytest.mark.parametrize("point", ["state-file:2", "on-save:2"])
def test_dpo_reference_killed_mid_save_resumes_exactly(tmp_path, uninterrupted_dpo, point):
    """The DPO reference's reference/ folder, killed while staged (checkpoint-4 absent) or before on_save moved
    it (checkpoint-4 complete without it): the reference and its averager resume exactly."""
    out = tmp_path / "run"
    killed(out, "--kind", "dpo", "--kill", point)
    resumed(out, "--kind", "dpo")
    for step in (4, 6):
        assert_same_state(
            uninterrupted_dpo / f"checkpoint-{step}" / DPO_FOLDER, out / f"checkpoint-{step}" / DPO_FOLDER
        )
