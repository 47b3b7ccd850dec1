"""The one collective the sharded layouts need: gather equal-size 1-D pieces from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

#: backends that take CPU tensors as they are ("ccl" is DeepSpeed's CPU backend, oneCCL)
_CPU_BACKENDS = {"gloo", "mpi", "ccl"}


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
