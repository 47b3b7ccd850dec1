"""Whether θ_t is finite, checked once per update at the cost of about one read of θ.

Σ_i θ_i is NaN or ±inf exactly when some θ_i is (NaN and inf propagate through a sum; a sum of finite fp32 or
bf16 values overflows only past 3.4e38, which trained weights never reach). So the check is one ``sum`` kernel
over a flat θ, and one per group of tensors over a list of them (:class:`FiniteCheck`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: consecutive small tensors are summed in groups of at most this many elements (16 MiB of fp32)
GROUP_ELEMENTS = 1 << 22


class FiniteCheck:
    """``check(θ)``: whether every element of θ (one flat tensor, or a list of 1-D tensors) is finite.

    A flat θ: one sum. A list: one sum per tensor of at least :data:`GROUP_ELEMENTS` elements, and one per group
    of consecutive smaller ones (of one dtype and device), copied into a persistent buffer first: one ``cat`` and
    one sum per group instead of one kernel per tensor, and nothing allocated per call. The groups are planned
    once per list (the readers keep their lists of views), so the buffers reach their size at the first call.
    """

    def __init__(self) -> None:
        #: persistent buffers by (dtype, device), each as large as the largest group of several tensors of that kind
        self.buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._key: tuple[object, ...] | None = None
        self._groups: list[tuple[int, int, int]] = []  # (first, end, elements): theta[first:end] is one group

    def __call__(self, theta: Tensor | Sequence[Tensor]) -> bool:
        if isinstance(theta, Tensor):
            return bool(theta.sum().isfinite())
        sums = [self._group_sum(theta[first:end], size) for first, end, size in self._plan(theta)]
        return bool(torch.stack(sums).sum().isfinite()) if sums else True

    def flat_copy(self, theta: Sequence[Tensor]) -> Tensor | None:
        """θ copied into the buffer as one flat tensor when it is one group of several tensors, else None.

        The update then checks and averages that copy: one kernel per op of the formula instead of a foreach
        over many small tensors, and the copy is the check's own read of θ (bit for bit the same averages).
        """
        groups = self._plan(theta)
        if len(theta) < 2 or len(groups) != 1:
            return None
        return self._concatenate(theta, groups[0][2])

    def memory_bytes(self) -> int:
        """Bytes of the persistent buffers (none until a list of small tensors is checked)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    # ------------------------------------------------------------------------------------------------
    def _plan(self, theta: Sequence[Tensor]) -> list[tuple[int, int, int]]:
        """The groups of ``theta``, remade only when it is another list of tensors."""
        key = (len(theta), *((theta[0].data_ptr(), theta[0].dtype, theta[-1].data_ptr()) if theta else ()))
        if key != self._key:
            self._groups, self._key = _groups(theta), key
        return self._groups

    def _group_sum(self, group: Sequence[Tensor], size: int) -> Tensor:
        if len(group) == 1:
            return group[0].sum().float()
        return self._concatenate(group, size).sum().float()

    def _concatenate(self, group: Sequence[Tensor], size: int) -> Tensor:
        kind = (group[0].dtype, group[0].device)
        buffer = self.buffers.get(kind)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[kind] = torch.empty(size, dtype=kind[0], device=kind[1])
        return torch.cat(list(group), out=buffer[:size])


def _groups(theta: Sequence[Tensor]) -> list[tuple[int, int, int]]:
    """Consecutive tensors of one dtype and device, of at most :data:`GROUP_ELEMENTS` elements in all (a larger
    tensor is a group of its own): ``(first, end, elements)``."""
    groups: list[tuple[int, int, int]] = []
    first, size = 0, 0
    for index, tensor in enumerate(theta):
        n = tensor.numel()
        other_kind = tensor.dtype != theta[first].dtype or tensor.device != theta[first].device
        if index > first and (size + n > GROUP_ELEMENTS or other_kind):
            groups.append((first, index, size))
            first, size = index, 0
        size += n
    if first < len(theta):
        groups.append((first, len(theta), size))
    return groups
