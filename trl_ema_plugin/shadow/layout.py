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

    def storage_key(self) -> tuple[int, ...]:
        """Data pointers of the live storages: unchanged as long as :meth:`local_tensors` views stay valid
        (readers cache those views and remake them when this changes, e.g. after ``param.data = ...``)."""
        return tuple(p.data_ptr() for p in self.params)

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

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__(named_params)
        self._flat: Tensor | None = None
        self._flat_key: tuple[int, ...] | None = None

    @property
    def flat(self) -> Tensor | None:
        """The live weights as one flat tensor when they are consecutive views of one storage, in order
        (after :meth:`make_contiguous`); None otherwise."""
        key = self.storage_key()
        if key != self._flat_key:
            self._flat, self._flat_key = consecutive_storage(self.params), key
        return self._flat

    @torch.no_grad()
    def make_contiguous(self) -> bool:
        """Re-point the parameters at consecutive views of one flat buffer (``param.data = view``, values kept),
        so that θ is read as one tensor. Only when they share one device and one dtype; returns whether they
        are laid out so now. The parameter objects stay the same (optimizer state, hooks and names follow);
        whatever later replaces a parameter's ``data`` only makes readers fall back to the per-tensor path."""
        if self.flat is not None:
            return True
        if len({p.device for p in self.params}) != 1 or len({p.dtype for p in self.params}) != 1:
            return False
        if any(hasattr(p, "ds_tensor") or not p.is_contiguous() for p in self.params):
            return False
        buffer = torch.empty(sum(p.numel() for p in self.params), dtype=self.dtype, device=self.device)
        offset = 0
        for p in self.params:
            view = buffer[offset : offset + p.numel()].view(p.shape)
            view.copy_(p.detach())
            p.data = view
            offset += p.numel()
        return self.flat is not None

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def local_tensors(self) -> list[Tensor]:
        return [p.detach().view(-1) for p in self.params]

    @torch.no_grad()
    def write_local(self, values: list[Tensor]) -> None:
        """One foreach copy; ``copy_`` casts to the live dtype and device exactly as ``Tensor.to`` does."""
        torch._foreach_copy_(self.local_tensors(), values)

    def _write_live(self, values: list[Tensor]) -> None:
        torch._foreach_copy_(self.local_tensors(), values)

    def gather(self, local: list[Tensor]) -> list[Tensor]:
        return [t.reshape(shape) for t, shape in zip(local, self.shapes, strict=True)]

    def local_part(self, full: list[Tensor]) -> list[Tensor]:
        return [t.reshape(-1) for t in full]


def consecutive_storage(params: list[nn.Parameter]) -> Tensor | None:
    """One flat tensor over ``params`` when they are contiguous, consecutive views of one storage (same dtype and
    device), in order; else None."""
    if not params:
        return None
    first = params[0]
    storage = first.untyped_storage()
    start = offset = first.storage_offset()
    for p in params:
        if (
            p.dtype != first.dtype
            or p.device != first.device
            or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != storage.data_ptr()
            or p.storage_offset() != offset
        ):
            return None
        offset += p.numel()
    with torch.no_grad():
        return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, start, (offset - start,))
