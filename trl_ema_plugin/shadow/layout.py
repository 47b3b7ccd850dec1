"""Where the live weights are and which part of them this process owns.

A layout hides the parallelism from the averager math: it hands out this rank's part of
the tracked weights as 1-D tensors (``local_tensors``), writes values back so the next
forward sees them (``write_local``), and assembles full tensors for saving (``gather``).

* :class:`LocalLayout`: one process, or each rank owning everything.
* ``SlicedLayout`` (replicated parameters, DDP / ZeRO-0/1/2) and ``Zero3Layout``
  (partitioned parameters): :mod:`trl_ema_plugin.integrations.deepspeed`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class ShadowLayout(ABC):
    """This rank's share of a list of named parameters."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]

    rank: int = 0
    world_size: int = 1

    @property
    @abstractmethod
    def shapes(self) -> list[torch.Size]:
        """Full (unsharded) shapes of the tracked tensors."""

    @abstractmethod
    def local_tensors(self) -> list[Tensor]:
        """Live 1-D views of this rank's part of each tensor (no copy; may be empty)."""

    @torch.no_grad()
    def write_local(self, values: list[Tensor]) -> None:
        """Set this rank's part of the live weights; the next forward on every rank sees it.

        ``values`` are shaped like :meth:`local_tensors`, of any dtype and device (the fp32 shadow,
        offloaded or not): each is cast to its live tensor's dtype and device first.
        """
        live = self.local_tensors()
        self._write_live([v.to(dtype=x.dtype, device=x.device) for v, x in zip(values, live, strict=True)])

    @abstractmethod
    def _write_live(self, values: list[Tensor]) -> None:
        """:meth:`write_local` with ``values`` already in the live tensors' dtype and device."""

    @abstractmethod
    def gather(self, local: list[Tensor]) -> list[Tensor]:
        """Full tensors (shaped) from every rank's local parts. Collective: call on all ranks."""

    @abstractmethod
    def local_part(self, full: list[Tensor]) -> list[Tensor]:
        """This rank's 1-D parts of full tensors (used when loading a saved state, any world size)."""

    def local_sizes(self) -> list[int]:
        return [t.numel() for t in self.local_tensors()]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def full_numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)


class LocalLayout(ShadowLayout):
    """Every tensor in full on this process."""

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def local_tensors(self) -> list[Tensor]:
        return [p.detach().view(-1) for p in self.params]

    def _write_live(self, values: list[Tensor]) -> None:
        torch._foreach_copy_(self.local_tensors(), values)

    def gather(self, local: list[Tensor]) -> list[Tensor]:
        return [t.reshape(shape) for t, shape in zip(local, self.shapes, strict=True)]

    def local_part(self, full: list[Tensor]) -> list[Tensor]:
        return [t.reshape(-1) for t in full]
