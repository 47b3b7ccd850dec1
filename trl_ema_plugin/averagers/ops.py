"""Element-wise ops on "tensors": one flat tensor (one kernel) or a list of tensors (one foreach call).

The averagers write their formulas once with these; the shadow store hands them θ_t either as one flat
fp32 tensor (a staging buffer, or a chunk of it) or as the list of the live fp32 tensors. Each op is
exactly the per-element operation of the corresponding ``torch`` / ``torch._foreach_*`` call, so the
results are bit for bit the same in both forms.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: one flat tensor, or a list of tensors of matching sizes
Tensors = Tensor | list[Tensor]


def is_flat(x: Tensors) -> bool:
    return isinstance(x, Tensor)


def copy_(dst: Tensors, src: Tensors) -> None:
    """dst ← src."""
    if isinstance(dst, Tensor):
        dst.copy_(src)
    else:
        torch._foreach_copy_(dst, src)


def lerp_(dst: Tensors, end: Tensors, weight: float) -> None:
    """dst ← dst + weight · (end − dst) (``torch.lerp``)."""
    if isinstance(dst, Tensor):
        dst.lerp_(end, weight)
    else:
        torch._foreach_lerp_(dst, end, weight)


def add_(dst: Tensors, other: Tensors) -> None:
    """dst ← dst + other."""
    if isinstance(dst, Tensor):
        dst.add_(other)
    else:
        torch._foreach_add_(dst, other)


def sub_(dst: Tensors, other: Tensors) -> None:
    """dst ← dst − other."""
    if isinstance(dst, Tensor):
        dst.sub_(other)
    else:
        torch._foreach_sub_(dst, other)


def mul_(dst: Tensors, scalar: float) -> None:
    """dst ← dst · scalar."""
    if isinstance(dst, Tensor):
        dst.mul_(scalar)
    else:
        torch._foreach_mul_(dst, scalar)


def div_(dst: Tensors, scalar: float) -> None:
    """dst ← dst / scalar."""
    if isinstance(dst, Tensor):
        dst.div_(scalar)
    else:
        torch._foreach_div_(dst, scalar)


def mul_into(out: Tensor, src: Tensor, scalar: float) -> None:
    """out ← src · scalar (flat tensors)."""
    torch.mul(src, scalar, out=out)
