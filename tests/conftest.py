"""Shared fixtures: tiny models, tokenizers and datasets built in code (no hub)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only oversubscribe the 2 cores


def _deepspeed_extensions_dir() -> None:
    """One JIT build cache per venv (and so per DeepSpeed version): venvs sharing one cache rebuild
    DeepSpeed's shm comm op over each other. A build killed midway (OOM) leaves torch's ``lock`` file,
    and every later run waits on it forever; no build takes 15 minutes, so an older lock is stale."""
    import hashlib
    import time
    from importlib.metadata import PackageNotFoundError, version

    try:
        ds_version = version("deepspeed")
    except PackageNotFoundError:
        return
    venv_key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    default = Path.home() / ".cache" / "torch_extensions" / f"deepspeed-{ds_version}-{venv_key}"
    extensions = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default)))
    for lock in extensions.glob("*/lock"):
        if time.time() - lock.stat().st_mtime > 15 * 60:
            warnings.warn(f"removing a stale torch extension build lock: {lock}", stacklevel=1)
            lock.unlink(missing_ok=True)


_deepspeed_extensions_dir()
# the 2-rank scripts import ds_common (configs, gather) and fsdp_common; tests load those scripts in-process too
DEEPSPEED_SCRIPTS = Path(__file__).parent / "deepspeed_scripts"
sys.path.insert(0, str(DEEPSPEED_SCRIPTS))
sys.path.insert(0, str(Path(__file__).parent / "fsdp_scripts"))

import torch  # noqa: E402
from cpu_launch import (  # noqa: E402
    remove_unused_deepspeed_shm_buffers,
    run_two_ranks,
    torchrun_two_ranks,
)

from trl_ema_plugin.demos.tiny import (  # noqa: E402
    tiny_dpo_dataset,
    tiny_llama,
    tiny_sft_dataset,
    tiny_tokenizer,
)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def sft_data():
    return tiny_sft_dataset(32, seed=0), tiny_sft_dataset(8, seed=1)


@pytest.fixture(scope="session")
def dpo_data():
    return tiny_dpo_dataset(16, seed=0), tiny_dpo_dataset(8, seed=1)


@pytest.fixture(autouse=True)
def _unlink_leaked_deepspeed_shared_memory():
    """Every DeepSpeed start-up on CPU leaks ~66 MB per rank in /dev/shm (RAM); a full suite leaks
    gigabytes and the OOM killer ends the run. After each test, unlink the buffers no process maps
    (never those of a launch still running, e.g. in a concurrent test session)."""
    yield
    remove_unused_deepspeed_shm_buffers()


# ---------------------------------------------------------------------------------------------
# Stack guard (CI): a stack that runs zero tests, or skips a test module because an import
# failed, fails. Only the imports listed here may be missing on a stack.
EXPECTED_MISSING_IMPORTS = {"latest": {"axolotl"}, "axolotl": set()}
_import_skips: list[str] = []
_passed = 0


def _missing_import(reason: str) -> str | None:
    marker = "could not import '"
    if marker not in reason:
        return None
    return reason.split(marker, 1)[1].split("'", 1)[0].split(".")[0]


def _check_skip(where: str, reason: str) -> None:
    stack = os.environ.get("TRL_EMA_STACK")
    module = _missing_import(reason)
    if stack and module is not None and module not in EXPECTED_MISSING_IMPORTS.get(stack, set()):
        _import_skips.append(f"{where}: {reason}")


def pytest_collectreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _check_skip(str(report.nodeid), str(report.longrepr[2]))


def pytest_runtest_logreport(report):
    global _passed
    if report.when == "call" and report.passed:
        _passed += 1
    if report.skipped and isinstance(report.longrepr, tuple):
        _check_skip(report.nodeid, str(report.longrepr[2]))


def pytest_sessionfinish(session, exitstatus):
    stack = os.environ.get("TRL_EMA_STACK")
    if not stack or hasattr(session.config, "workerinput"):
        return
    problems = list(_import_skips)
    if _passed == 0:
        problems.append(f"the {stack} stack ran zero tests")
    if problems:
        print("\nSTACK GUARD FAILED:\n  " + "\n  ".join(problems))
        session.exitstatus = 1


def launch_two_ranks(
    script: Path, args: list[str], timeout: int = 600, launcher: str = "deepspeed", processes: int = 2
) -> subprocess.CompletedProcess:
    """``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 script args`` (``launcher="torchrun"``: ``torchrun
    --nproc_per_node <processes> script args``, for the FSDP2 scripts) with stdout and stderr merged.

    DeepSpeed and gloo on CPU occasionally lose a rank on a loaded 2-core machine (an abort in the
    launcher or at interpreter exit, never a wrong value); a failed launch is relaunched once on a new
    port, with a warning that keeps the first failure's error lines. A second failure fails the test.
    """
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # the repository (this checkout first), tests/ and ds_common for the scripts, whatever their folder
    paths = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent), str(DEEPSPEED_SCRIPTS)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    if launcher == "torchrun":
        run = functools.partial(torchrun_two_ranks, processes=processes)
    elif processes == 2:
        run = run_two_ranks
    else:
        raise ValueError(f"launcher={launcher!r} starts 2 processes, not {processes}")
    for attempt in (1, 2):
        result = run(
            [str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout, cwd=script.parent,
        )  # fmt: skip
        if result.returncode == 0 or attempt == 2:
            return result
        errors = [line for line in result.stdout.splitlines() if "Error" in line or "terminate" in line][:10]
        warnings.warn(f"2-rank launch of {script.name} failed once, relaunching:\n" + "\n".join(errors), stacklevel=2)
    raise AssertionError("unreachable")
