"""The averaging update costs per byte: on the CPU proxy of a Llama-1B LoRA adapter (224 tensors, 1.41 M elements),
``AveragedWeights.step`` stays within a generous bound of one flat fp32 lerp over the same elements.

Measured in this process by ``benchmarks/bench_update.py`` (median of 200 calls each, back to back). The bounds
are twice the target (4x; 3x for fp32 weights, which need no conversion) so that a loaded machine does not fail
them, while the per-tensor costs before (bf16 15-59x, fp32 7.2-8.2x) do. An attempt over the bound is measured
again, up to three times.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_update import measure

BOUND = {torch.bfloat16: 8.0, torch.float32: 6.0}


@pytest.mark.parametrize("layout", ["contiguous", "separate"])
@pytest.mark.parametrize("method", ["ema", "bema"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_update_costs_a_few_flat_lerps(dtype, method, layout):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratios = []
        for _ in range(3):
            row = measure(method, dtype, layout, repeats=200)
            ratios.append(row["ratio"])
            if row["ratio"] <= BOUND[dtype]:
                break
    finally:
        torch.set_num_threads(threads)
    assert row["tensors"] == 224 and row["elements"] == 1_409_024
    assert min(ratios) <= BOUND[dtype], f"update / flat lerp = {ratios} (bound {BOUND[dtype]})"
