"""The torch.distributed questions the plugin asks, and the two collectives its sharded layouts need.

* is there a process group, of how many processes (:func:`world_size`), and which one writes files
  (:func:`is_writer`);
* where a tensor must be to take part in a collective (:func:`communication_device`);
* gather equal-size 1-D pieces from every rank (:func:`all_gather_rows`), OR flags over the ranks
  (:func:`all_reduce_max_flags`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: backends that take CPU tensors as they are ("ccl" is DeepSpeed's CPU backend, oneCCL)
_CPU_BACKENDS = {"gloo", "mpi", "ccl"}


def has_process_group() -> bool:
    """Whether a torch.distributed process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if has_process_group() else 1


def is_writer(state: Any) -> bool:
    """Whether this process writes shared files: global rank 0 when a process group exists.

    ``state.is_world_process_zero`` (a ``TrainerState``) is the trainer's view; the process group is
    checked first so that two processes can never both write (and race on the same folder).
    """
    if has_process_group():
        return dist.get_rank() == 0
    return bool(state.is_world_process_zero)


def communication_device(device: torch.device, group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor on ``device`` must be to take part in a collective of ``group``.

    NCCL (and the other accelerator backends) need accelerator tensors: a shadow offloaded to
    CPU, or a ZeRO-3 partition offloaded to CPU, travels through the current accelerator.
    """
    backend = str(dist.get_backend(group))
    if device.type != "cpu" or ":" in backend or backend in _CPU_BACKENDS:
        return device
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return device
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_gather_rows(local: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``[world, n]``: row ``r`` is rank ``r``'s 1-D ``local`` (every rank passes the same ``n``).

    One ``all_gather`` call; the result is on ``local``'s device and dtype.
    """
    world = dist.get_world_size(group)
    device = communication_device(local.device, group)
    send = local.detach().reshape(-1).to(device).contiguous()
    rows = torch.empty(world, send.numel(), dtype=send.dtype, device=device)
    if send.numel() > 0:
        dist.all_gather(list(rows.unbind(0)), send, group=group)
    return rows.to(local.device)


def all_reduce_max_flags(flags: list[bool], device: torch.device, group: dist.ProcessGroup | None = None) -> list[bool]:
    """Element-wise OR of boolean flags over the ranks of ``group`` (so every rank agrees)."""
    if not flags:
        return []
    comm = communication_device(device, group)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=comm)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return [bool(x) for x in tensor.tolist()]
