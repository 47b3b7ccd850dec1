"""Shared by the 2-rank FSDP2 test scripts: a collective counter, a reference gather, the trainer's FSDP2
arguments and the process set-up and exit.

``CollectiveCounter`` runs the code under ``torch.profiler`` and counts the process group's own
communication events (``gloo:all_gather``, ``gloo:all_reduce``...): every collective, whichever
API issued it (``torch.distributed``, functional collectives, DTensor redistribution), reaches
the backend and shows up there. Instrumentation of the real process group, not a mock.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: event-name prefixes of the communication ops of a CPU process group
BACKEND_EVENTS = ("gloo:", "mpi:", "ccl:")


class CollectiveCounter:
    """Counts collectives issued inside :meth:`counting` windows (``events``: their names)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @contextmanager
    def counting(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        self.events += [e.name for e in prof.events() if e.name.startswith(BACKEND_EVENTS)]

    @property
    def count(self) -> int:
        return len(self.events)


def full_weights(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full weights in float64 on CPU through DTensor's own ``full_tensor()`` (collective), independent
    of the layout under test. Pass the sharded parameters (``named_parameters()`` taken between steps):
    after a forward without backward, FSDP2 may register the unsharded (mixed-precision) copies instead."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in named:
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = full.detach().to("cpu", torch.float64, copy=True)
    return out


def trainer_fsdp2_args(reshard_after_forward: bool = True, **config: Any) -> dict[str, Any]:
    """Training arguments for accelerate's FSDP2 plugin (each decoder layer and the root sharded), with
    accelerate's CPU gate lifted (:mod:`accelerate_cpu_fsdp`); ``config``: more ``fsdp_config`` entries."""
    from accelerate_cpu_fsdp import allow_fsdp_on_cpu

    allow_fsdp_on_cpu()
    fsdp_config = {
        "fsdp_version": 2,
        "reshard_after_forward": reshard_after_forward,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        **config,
    }
    return {"fsdp": True, "fsdp_config": fsdp_config}


def finish() -> None:
    """Every rank done: barrier, destroy the process group, :func:`exit_now`."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """Leave without interpreter finalization, once the outputs are written and the process group is
    destroyed: on this CPU machine a gloo rank now and then aborts during finalization ("terminate
    called without an active exception", 1 in 5 launches of fsdp2_loop.py --full; torch's own
    analysis in pytorch/pytorch#179291: gloo worker threads still holding tensors at teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def base_parser() -> argparse.ArgumentParser:
    """``--output_dir`` and ``--no-reshard`` (FSDP2's ``reshard_after_forward=False``), shared by the scripts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=False")
    return parser


def prepare_process() -> None:
    """No hub access; one thread per rank (two ranks share the 2 cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def layout_facts(rank: int, weights: dict) -> dict:
    """This rank's layout class, shadow bytes per averager, and its share of the averaged elements."""
    layout = next(iter(weights.values())).layout
    return {
        "rank": rank,
        "layout": type(layout).__name__,
        "shadow_bytes": {name: w.memory_bytes() for name, w in weights.items()},
        "local_numel": sum(layout.local_sizes()),
        "full_numel": layout.full_numel(),
    }
