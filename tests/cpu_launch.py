"""Launching 2-rank DeepSpeed and torchrun (FSDP2) runs on CPU (tests, benchmarks), and cleaning up after them.

DeepSpeed's CPU shared-memory all-reduce (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) creates one
~66 MB ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank at start-up and
never unlinks it. ``/dev/shm`` is RAM, so each CPU launch leaks ~66 MB x world size until reboot;
a few hundred launches fill the machine and the OOM killer takes the next job.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHARED_MEMORY = Path("/dev/shm")


def free_port() -> int:
    """A TCP port the OS hands out, for a distinct ``--master_port`` per launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script_and_args: Sequence[str], **run_kwargs: Any) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 --master_port <free port> script args`` with this interpreter
    (``run_kwargs`` go to :func:`subprocess.run`), then unlink the launch's ``/dev/shm`` buffers."""
    port = free_port()
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    try:
        return subprocess.run([*launcher, *script_and_args], **run_kwargs)
    finally:
        remove_deepspeed_shm_buffers(deepspeed_shm_buffers(port))


def torchrun_two_ranks(
    script_and_args: Sequence[str], processes: int = 2, **run_kwargs: Any
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 --master_port <free port> script args`` with this interpreter (FSDP2
    scripts: gloo on CPU, no DeepSpeed buffers to clean up); ``processes``: another number of ranks."""
    port, count = str(free_port()), str(processes)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", count, "--master_port", port]
    return subprocess.run([*launcher, *script_and_args], **run_kwargs)


def deepspeed_shm_buffers(master_port: int | str = "*") -> set[Path]:
    """This user's DeepSpeed CPU all-reduce buffers in ``/dev/shm`` (of one launch, or all)."""
    return set(SHARED_MEMORY.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"))


def remove_deepspeed_shm_buffers(paths: set[Path]) -> None:
    """Unlink leaked buffers; call only after the processes that mapped them have exited."""
    for path in paths:
        path.unlink(missing_ok=True)


def remove_unused_deepspeed_shm_buffers(min_age_s: float = 5.0) -> None:
    """Unlink this user's buffers that no live process maps (safe beside other running launches).

    A rank creates its buffer, then maps it; a buffer younger than ``min_age_s`` may be in that
    window and is kept. Deleting a live launch's buffer would leave its other ranks waiting forever.
    """
    buffers = deepspeed_shm_buffers()
    if not buffers:
        return
    in_use = _mapped_shm_buffers()
    now = time.time()
    for path in buffers:
        try:
            young = now - path.stat().st_mtime < min_age_s
        except FileNotFoundError:
            continue
        if not young and str(path) not in in_use:
            path.unlink(missing_ok=True)


def _mapped_shm_buffers() -> set[str]:
    """Paths of DeepSpeed buffers that some process has mapped (``/proc/<pid>/maps``)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process exited, or belongs to another user
            continue
        for line in text.splitlines():
            if "deepspeed_allreduce_buffer" in line:
                mapped.add(line.split(maxsplit=5)[-1].removesuffix(" (deleted)"))
    return mapped
