"""Cost of one averaging update against one flat fp32 lerp of the same elements, in one process (not a test).

The tensors are those of a LoRA r=16 adapter on every linear layer of a Llama with Llama-3.2-1B layer shapes
scaled down ``--scale`` times (default 8: hidden 256, 16 layers, MLP 1024, 4/1 heads of 64: 224 tensors,
1.41 M elements). For each live dtype (bf16, fp32), method (ema, bema) and layout of the live weights
(``separate``: one storage per tensor; ``contiguous``: consecutive views of one flat buffer, as the TRL callback
lays out a PEFT adapter), it prints the median time of ``AveragedWeights.step`` and of ``torch.lerp_`` over a flat
fp32 buffer of the same number of elements, and their ratio. CPU: one torch thread, wall
clock; CUDA (``--device cuda``): CUDA events around each call. Both are timed in blocks (back to back: their
buffers stay in the CPU caches) and alternately (each finds the caches filled by the other).

    python benchmarks/bench_update.py                 # ~10 s on a CPU
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_update.py   # the same measure of another version
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from trl_ema_plugin import AveragerSpec
from trl_ema_plugin.shadow import AveragedWeights, LocalLayout

# Llama-3.2-1B: hidden 2048, 16 layers, MLP 8192, 32 query / 8 key-value heads of dimension 64
LLAMA_1B = dict(hidden=2048, layers=16, inter=8192, heads=32, kv=8, head_dim=64)


def lora_shapes(scale: int = 8, rank: int = 16) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of LoRA A [r, in] and B [out, r] on q/k/v/o/gate/up/down of every layer, widths / ``scale``."""
    hidden, inter = LLAMA_1B["hidden"] // scale, LLAMA_1B["inter"] // scale
    heads, kv, head_dim = LLAMA_1B["heads"] // scale, max(LLAMA_1B["kv"] // scale, 1), LLAMA_1B["head_dim"]
    projections = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    shapes = []
    for layer in range(LLAMA_1B["layers"]):
        for name, (fan_in, fan_out) in projections.items():
            shapes.append((f"layers.{layer}.{name}.lora_A", (rank, fan_in)))
            shapes.append((f"layers.{layer}.{name}.lora_B", (fan_out, rank)))
    return shapes


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Seconds of one call: wall clock on the CPU, CUDA events on a GPU."""
    if device.type != "cuda":

        def wall(fn: Callable[[], Any]) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return wall

    def events(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return events


def measure(
    method: str,
    dtype: torch.dtype,
    layout: str,
    repeats: int = 200,
    scale: int = 8,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Median µs of ``AveragedWeights.step`` (an update every step) and of one flat fp32 lerp, in blocks and alternately."""
    where = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    named = [
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=where, dtype=dtype)))
        for name, shape in lora_shapes(scale)
    ]
    local = LocalLayout(named)
    if layout == "contiguous":
        if not hasattr(local, "make_contiguous"):
            raise RuntimeError("this version of trl_ema_plugin cannot lay the weights out contiguously")
        local.make_contiguous()
    weights = AveragedWeights(AveragerSpec(method=method, update_every=1), local, where)
    numel = sum(p.numel() for _, p in named)
    average = torch.randn(numel, generator=generator).to(where)
    target = torch.randn(numel, generator=generator).to(where)
    clock = _timer(where)
    step = [0]

    def update() -> None:
        weights.step(step[0])
        step[0] += 1

    def lerp() -> None:
        average.lerp_(target, 0.01)

    for _ in range(10):  # warm-up (the first call starts the average)
        update()
        lerp()
    # back to back, each in a block (its buffers stay in the CPU caches), then alternating (both find them cold)
    hot_updates = [clock(update) for _ in range(repeats)]
    hot_lerps = [clock(lerp) for _ in range(repeats)]
    updates, lerps = [], []
    for _ in range(repeats):
        updates.append(clock(update))
        lerps.append(clock(lerp))
    us = {
        key: statistics.median(values) * 1e6
        for key, values in {"update": hot_updates, "lerp": hot_lerps, "update_alt": updates, "lerp_alt": lerps}.items()
    }
    return {
        "method": method,
        "live_dtype": str(dtype).replace("torch.", ""),
        "layout": layout,
        "tensors": len(named),
        "elements": numel,
        "update_us": us["update"],
        "lerp_us": us["lerp"],
        "ratio": us["update"] / us["lerp"],
        "update_alt_us": us["update_alt"],
        "lerp_alt_us": us["lerp_alt"],
        "ratio_alt": us["update_alt"] / us["lerp_alt"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--scale", type=int, default=8, help="divide Llama-1B's widths by this (1: the real sizes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--layouts", default="separate,contiguous")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure(method, dtype, layout, args.repeats, args.scale, args.device)
        for dtype in (torch.bfloat16, torch.float32)
        for method in ("ema", "bema")
        for layout in args.layouts.split(",")
    ]
    first = rows[0]
    print(
        f"AveragedWeights.step vs one flat fp32 lerp, {first['tensors']} tensors, {first['elements'] / 1e6:.2f} M "
        f"elements (LoRA r=16 all-linear, Llama-3.2-1B shapes / {args.scale}), {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), median of {args.repeats}"
    )
    print("blocks: each measured back to back (buffers in the CPU caches); alternating: update, lerp, update, ...")
    print(
        f"{'live':<9} {'method':<6} {'layout':<11} {'update µs':>10} {'lerp µs':>8} {'ratio':>6}   "
        f"{'alternating: update µs':>22} {'lerp µs':>8} {'ratio':>6}"
    )
    for row in rows:
        print(
            f"{row['live_dtype']:<9} {row['method']:<6} {row['layout']:<11} {row['update_us']:>10.1f} "
            f"{row['lerp_us']:>8.1f} {row['ratio']:>6.2f}   {row['update_alt_us']:>22.1f} {row['lerp_alt_us']:>8.1f} "
            f"{row['ratio_alt']:>6.2f}"
        )


if __name__ == "__main__":
    main()
