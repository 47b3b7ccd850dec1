"""The averaging update costs per byte, not per tensor.

On the CPU proxy of a Llama-1B LoRA adapter (``benchmarks/bench_update.py``: 224 tensors, 1.41 M elements),
``AveragedWeights.step`` dispatches the same few kernels whether the adapter has 56 tensors or 224, and allocates
nothing of the adapter's size. Before the flat update it dispatched several kernels per tensor (and converted each
bf16 tensor into a new fp32 copy), which is what made an update cost ~100x the memory-bandwidth bound on a GPU.
How long the kernels take is the benchmark's job (``python benchmarks/bench_update.py``, numbers in the README): a
timed test fails on a loaded machine.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trl_ema_plugin import AveragerSpec
from trl_ema_plugin.shadow import AveragedWeights, LocalLayout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_update import lora_shapes

#: kernels of one update: the staging copy of θ, the non-finite check (a sum and its test), one lerp
MOST_KERNELS = 12


class KernelLog(TorchDispatchMode):
    """Counts the aten kernels dispatched inside it, and the largest tensor a kernel allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.largest_new = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.kernels[str(func)] += 1
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        is_view = func._schema.returns and func._schema.returns[0].alias_info is not None
        for tensor in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            if id(tensor) not in inputs and not is_view:
                self.largest_new = max(self.largest_new, tensor.numel())
        return out


def one_update(method: str, dtype: torch.dtype, layout: str, tensors: int) -> KernelLog:
    """The kernels of ``AveragedWeights.step`` at an update step (not the first, which starts the average)."""
    generator = torch.Generator().manual_seed(0)
    named = [
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)))
        for name, shape in lora_shapes(8)[:tensors]
    ]
    local = LocalLayout(named)
    if layout == "contiguous":
        local.make_contiguous()  # as the TRL callback lays out a PEFT adapter
    weights = AveragedWeights(AveragerSpec(method=method, update_every=1), local, torch.device("cpu"))
    for t in range(3):
        weights.step(t)
    with KernelLog() as log:
        weights.step(3)
    return log


@pytest.mark.parametrize("layout", ["contiguous", "separate"])
@pytest.mark.parametrize("method", ["ema", "bema", "dema", "ouema"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_update_dispatches_the_same_few_kernels_for_any_number_of_tensors(dtype, method, layout):
    small, proxy = one_update(method, dtype, layout, 56), one_update(method, dtype, layout, 224)
    assert sum(proxy.kernels.values()) == sum(small.kernels.values()), (small.kernels, proxy.kernels)
    assert sum(proxy.kernels.values()) <= MOST_KERNELS, proxy.kernels


@pytest.mark.parametrize("layout", ["contiguous", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_update_allocates_nothing_of_the_adapters_size(dtype, layout):
    log = one_update("bema", dtype, layout, 224)
    assert log.largest_new <= 1, f"an update allocated a tensor of {log.largest_new} elements: {log.kernels}"
