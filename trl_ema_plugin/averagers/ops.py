"""Element-wise ops on "tensors": one flat tensor (one kernel) or a list of tensors (one foreach call).

The averagers write their formulas once with these; the shadow store hands them θ_t either as one flat
fp32 tensor (a staging buffer, or a chunk of it) or as the list of the live fp32 tensors. Each op is
exactly the per-element operation of the corresponding ``torch`` / ``torch._foreach_*`` call, so the
results are bit for bit the same in both forms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: one flat tensor, or a list of tensors of matching sizes
Tensors = Tensor | list[Tensor]


def _in_place(name: str, formula: str) -> Callable[..., None]:
    """``dst.<name>_(x)`` on a flat tensor, ``torch._foreach_<name>_(dst, x)`` on a list."""
    foreach = getattr(torch, f"_foreach_{name}_")

    def op(dst: Tensors, *args: Any) -> None:
        if isinstance(dst, Tensor):
            getattr(dst, f"{name}_")(*args)
        else:
            foreach(dst, *args)

    op.__name__ = op.__qualname__ = f"{name}_"
    op.__doc__ = formula
    return op


copy_ = _in_place("copy", "dst ← src.")
lerp_ = _in_place("lerp", "dst ← dst + weight · (end − dst) (``torch.lerp``).")
add_ = _in_place("add", "dst ← dst + other.")
sub_ = _in_place("sub", "dst ← dst − other.")
mul_ = _in_place("mul", "dst ← dst · scalar.")
div_ = _in_place("div", "dst ← dst / scalar.")


def mul_into(out: Tensor, src: Tensor, scalar: float) -> None:
    """out ← src · scalar (flat tensors)."""
    torch.mul(src, scalar, out=out)
