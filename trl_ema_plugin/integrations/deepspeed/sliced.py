"""Replicated parameters (DDP, DeepSpeed ZeRO-0/1/2): each rank averages a 1/world slice.

Every rank holds the full weights, and they are identical after each optimizer step. Flatten
the tracked parameters in order and concatenate them into one virtual vector of N elements;
rank r owns the contiguous range ``[r·c, min((r+1)·c, N))`` with ``c = ⌈N / world⌉`` (the last
rank may own less, or nothing). The shadow of each rank covers only that range, so its memory
is ≈ 1/world of the single-process figure, and an update touches only local memory (no
communication per step).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...distributed import all_gather_rows, has_process_group
from ...shadow.layout import ShadowLayout


class SlicedLayout(ShadowLayout):
    """This rank's contiguous 1/world slice of the concatenated, flattened tracked parameters."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], group: dist.ProcessGroup | None = None) -> None:
        super().__init__(named_params)
        if not has_process_group():
            raise ValueError("SlicedLayout needs an initialized torch.distributed process group")
        not_contiguous = [n for n, p in named_params if not p.is_contiguous()]
        if not_contiguous:
            raise ValueError(f"SlicedLayout needs contiguous parameters; not contiguous: {not_contiguous[:3]}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.numels = [p.numel() for p in self.params]
        self.total = sum(self.numels)
        self.chunk = math.ceil(self.total / self.world_size)
        start = min(self.rank * self.chunk, self.total)
        end = min(start + self.chunk, self.total)
        self.owned = (start, end)
        self.ranges = []  # this rank's [lo, hi) inside each flattened parameter
        offset = 0
        for numel in self.numels:
            lo = min(max(start - offset, 0), numel)
            hi = min(max(end - offset, 0), numel)
            self.ranges.append((lo, hi))
            offset += numel

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def local_tensors(self) -> list[Tensor]:
        return [p.detach().view(-1)[lo:hi] for p, (lo, hi) in zip(self.params, self.ranges, strict=True)]

    def _full_flat(self, local: list[Tensor]) -> Tensor:
        """The N-element vector assembled from every rank's slice (one all_gather)."""
        mine = torch.cat([x.reshape(-1) for x in local]) if local else torch.empty(0, device=self.device)
        padded = torch.zeros(self.chunk, dtype=mine.dtype, device=mine.device)
        padded[: mine.numel()] = mine
        return all_gather_rows(padded, self.group).reshape(-1)[: self.total]

    def _write_live(self, values: list[Tensor]) -> None:
        """Write this rank's slice, then all-gather so that every replica holds the new full weights."""
        full = self._full_flat(values)
        for p, part in zip(self.params, full.split(self.numels), strict=True):
            p.detach().view(-1).copy_(part)

    @torch.no_grad()
    def gather(self, local: list[Tensor]) -> list[Tensor]:
        full = self._full_flat(local)
        # separate storages: safetensors refuses tensors that share memory
        return [part.view(shape).clone() for part, shape in zip(full.split(self.numels), self.shapes, strict=True)]

    def local_part(self, full: list[Tensor]) -> list[Tensor]:
        return [t.reshape(-1)[lo:hi] for t, (lo, hi) in zip(full, self.ranges, strict=True)]
