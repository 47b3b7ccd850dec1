"""Partitioned parameters (DeepSpeed ZeRO-3): the shadow covers this rank's partition only.

DeepSpeed splits each parameter into ``world`` partitions of ``c = ⌈numel / world⌉`` elements;
rank r holds elements ``[r·c, (r+1)·c)`` in ``p.ds_tensor`` and the last partition is padded at
its end. Between forwards ``p.data`` is empty, unless the parameter is *persisted* (smaller than
``stage3_param_persistence_threshold``): then its full ``p.data`` stays in place as well.

* ``local_tensors``: ``p.ds_tensor`` without its padding, read in place (no all-gather per step).
* ``write_local``: writes ``ds_tensor`` and, for parameters whose full ``p.data`` is present
  (persisted, or currently gathered), rebuilds ``p.data`` from the new partitions with one
  all-gather, so the next forward sees the new values in both cases.
* ``gather``: concatenates the partitions, trims to ``ds_numel`` and views ``ds_shape``; one
  all-gather per call, used when saving (never per step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...distributed import all_gather_rows, all_reduce_max_flags
from ...shadow.layout import ShadowLayout


def _check_partitioned(named_params: list[tuple[str, nn.Parameter]]) -> None:
    missing = [n for n, p in named_params if getattr(p, "ds_tensor", None) is None]
    if missing:
        raise ValueError(
            f"ZeRO-3 layout: parameter(s) {missing[:3]} are not partitioned by DeepSpeed (no ds_tensor); "
            "build the layout after the DeepSpeed engine wraps the model (the callback does so in on_train_begin)"
        )
    for name, p in named_params:
        if str(getattr(p.ds_tensor, "final_location", None)).endswith("nvme"):
            raise ValueError(
                f"ZeRO-3 layout: parameter {name!r} is offloaded to NVMe (offload_param.device='nvme'); "
                "weight averaging supports offload_param.device 'none' or 'cpu'"
            )
        if hasattr(p.ds_tensor, "ds_quant_scale"):
            raise ValueError(
                f"ZeRO-3 layout: parameter {name!r} is stored quantized (zero_quantized_nontrainable_weights); "
                "weight averaging needs the partitions in a floating-point dtype"
            )
    groups = {id(p.ds_process_group) for _, p in named_params}
    if len(groups) > 1:
        raise ValueError("ZeRO-3 layout: the tracked parameters are partitioned over different process groups")


class Zero3Layout(ShadowLayout):
    """This rank's ZeRO-3 partition of every tracked parameter (``p.ds_tensor`` minus padding)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__(named_params)
        _check_partitioned(named_params)
        self.group = self.params[0].ds_process_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.partition_sizes = [p.ds_tensor.numel() for p in self.params]
        self.valid = [
            max(0, min(size, p.ds_numel - self.rank * size))
            for p, size in zip(self.params, self.partition_sizes, strict=True)
        ]

    @property
    def shapes(self) -> list[torch.Size]:
        return [torch.Size(p.ds_shape) for p in self.params]

    @property
    def device(self) -> torch.device:
        return self.params[0].ds_tensor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].ds_tensor.dtype

    def local_tensors(self) -> list[Tensor]:
        return [p.ds_tensor.data.view(-1)[:n] for p, n in zip(self.params, self.valid, strict=True)]

    def storage_key(self) -> tuple[int, ...]:
        return tuple(p.ds_tensor.data_ptr() for p in self.params)

    def _assemble(self, partitions: list[Tensor], params: list[nn.Parameter]) -> list[Tensor]:
        """Full flat tensors of ``params`` from this rank's padded ``partitions`` (one all-gather)."""
        rows = all_gather_rows(torch.cat(partitions), self.group)  # [world, Σ c_i]
        full, offset = [], 0
        for p, part in zip(params, partitions, strict=True):
            size = part.numel()
            full.append(rows[:, offset : offset + size].reshape(-1)[: p.ds_numel])
            offset += size
        return full

    def _write_live(self, values: list[Tensor]) -> None:
        """Write the partitions, then refresh every full ``p.data`` that is present (persisted params)."""
        for p, n, value in zip(self.params, self.valid, values, strict=True):
            p.ds_tensor.data.view(-1)[:n].copy_(value)
            if getattr(p, "ds_secondary_tensor", None) is not None:
                p.ds_secondary_tensor = None  # ZeRO++ hpZ copy: stale now, rebuilt at the next gather
        present = [p.data.numel() > 0 for p in self.params]
        present = all_reduce_max_flags(present, self.device, self.group)
        gathered = [p for p, flag in zip(self.params, present, strict=True) if flag]
        if not gathered:
            return
        full = self._assemble([p.ds_tensor.data.view(-1) for p in gathered], gathered)
        for p, values_full in zip(gathered, full, strict=True):
            if p.data.numel() == p.ds_numel:
                p.data.copy_(values_full.view(p.data.shape))

    @torch.no_grad()
    def gather(self, local: list[Tensor]) -> list[Tensor]:
        padded = []
        for x, size in zip(local, self.partition_sizes, strict=True):
            part = torch.zeros(size, dtype=x.dtype, device=x.device)
            part[: x.numel()] = x.reshape(-1)
            padded.append(part)
        full = self._assemble(padded, self.params)
        return [t.reshape(shape).clone() for t, shape in zip(full, self.shapes, strict=True)]

    def local_part(self, full: list[Tensor]) -> list[Tensor]:
        parts = []
        for t, size, n in zip(full, self.partition_sizes, self.valid, strict=True):
            start = self.rank * size
            parts.append(t.reshape(-1)[start : start + n])
        return parts
