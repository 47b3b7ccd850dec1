"""The performance table of issue 12, measured side by side in one run (not a test).

Three sections, each in its own try/except (a failure is recorded in the JSON and the others go on):

* ``update``: one EMA / BEMA update through ``AveragedWeights.step`` against a flat fp32 ``lerp_`` and a
  memcpy of the same number of fp32 elements: a LoRA r=16 adapter on every linear layer of a Llama with
  Llama-3.2-1B layer shapes (224 tensors, 11.27 M elements; laid out in one flat buffer, as the TRL
  callback lays out a PEFT adapter, and as separate tensors), and the full-fine-tuning shadow of the whole
  model (1.24 B elements, separate tensors), live weights in bf16 and in fp32; the EMA also without its
  non-finite check of θ_t (one host sync per update). CUDA events around each call.
* ``steps``: step time in a real TRL ``SFTTrainer`` (LoRA r=16 all-linear, the same Llama, bf16, batch
  8 x 512, vocabulary 32000): no averaging / ema / bema / bema without its non-finite check (what the check's
  host sync costs) / no averaging with the adapter laid out flat / four averagers / ema offloaded / bema +
  ``SelfDistillationCallback`` (every step, every 4th step, with 4x larger chunks, with Liger's fused JSD),
  variants interleaved after one untimed warm-up run. Per step: CUDA events from ``on_step_begin`` to the
  end of ``on_step_end`` (after every callback), the host time spent in our callbacks, and the peak memory.
* ``trl``: full fine-tuning of a ~159 M Llama: our ``bema`` against TRL's ``BEMACallback`` (default, and
  ``device="cuda"``).

Results go to ``<out>/results.json`` (rewritten after every section) and ``<out>/table.md``, the table of the
README's "Performance on a GPU". ``--cpu`` runs everything on the CPU with small shapes (a minute or two): it
validates the script anywhere, and its numbers are CPU numbers, labelled so.

    python benchmarks/bench_gpu.py --out /tmp/gpu_out          # on a CUDA machine, ~3 minutes on an H200
    python benchmarks/bench_gpu.py --cpu --out /tmp/cpu_out    # anywhere
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import LLAMA_1B, lora_shapes  # noqa: E402

LLAMA_1B_VOCAB = 128256  # the real model's vocabulary: the full-fine-tuning shadow has its 1.24 B parameters
RESULTS: dict[str, Any] = {}
#: the ``bema`` variant without the non-finite check of θ_t (one host sync per update on the side stream)
NO_CHECK = "bema (no NaN check)"
#: no averaging, the adapter laid out in one flat buffer as the callback lays it out: what the layout alone does
PACKED = "none (packed)"


# ------------------------------------------------------------------------------------------- helpers
def log(message: str = "") -> None:
    print(message, flush=True)


def on_cuda(opts: argparse.Namespace) -> bool:
    return not opts.cpu and torch.cuda.is_available()


def device(opts: argparse.Namespace) -> torch.device:
    return torch.device("cuda") if on_cuda(opts) else torch.device("cpu")


def free_memory(opts: argparse.Namespace) -> None:
    gc.collect()
    if on_cuda(opts):
        torch.cuda.empty_cache()


def write_results(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=2, default=str))
    tmp.replace(out / "results.json")


def time_us(fn: Callable[[], Any], iters: int, warmup: int, cuda: bool) -> float:
    """Median µs of ``fn()``: CUDA events around each call on the GPU, wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) * 1e3 for start, end in pairs]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def versions(opts: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    if on_cuda(opts):
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        info["device"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    return info


# --------------------------------------------------------------------------------- section: update
def full_shapes(hidden: int, layers: int, inter: int, heads: int, kv: int, head_dim: int, vocab: int) -> list:
    """Every parameter of a Llama with tied embeddings (embedding, q k v o gate up down and 2 norms per layer, norm)."""
    q, k = heads * head_dim, kv * head_dim
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(q, hidden), (k, hidden), (k, hidden), (hidden, q), (inter, hidden), (inter, hidden)]
        shapes += [(hidden, inter), (hidden,), (hidden,)]
    return [*shapes, (hidden,)]


def flat_references(n: int, opts: argparse.Namespace) -> tuple[float, float]:
    """µs of a memcpy and of one ``lerp_`` over flat fp32 buffers of ``n`` elements."""
    src, dst = torch.randn(n, device=device(opts)), torch.randn(n, device=device(opts))
    memcpy = time_us(lambda: dst.copy_(src), opts.iters, opts.warmup, on_cuda(opts))
    lerp = time_us(lambda: dst.lerp_(src, 0.001), opts.iters, opts.warmup, on_cuda(opts))
    return memcpy, lerp


def update_case(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, layout_kind: str, opts: argparse.Namespace
) -> dict[str, Any]:
    """µs of memcpy, lerp, and the EMA / BEMA update of ``shapes`` live in ``dtype``; bandwidths and ratios."""
    from trl_ema_plugin import AveragerSpec
    from trl_ema_plugin.shadow import AveragedWeights, LocalLayout

    where, cuda = device(opts), on_cuda(opts)
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    memcpy, lerp = flat_references(n, opts)
    free_memory(opts)
    params = [torch.nn.Parameter(torch.randn(s, device=where).mul_(0.02).to(dtype)) for s in shapes]
    layout = LocalLayout([(f"p{i}", p) for i, p in enumerate(params)])
    if layout_kind == "contiguous":
        layout.make_contiguous()
    result: dict[str, Any] = {
        "elements": n, "tensors": len(shapes), "live_dtype": str(dtype).replace("torch.", ""), "layout": layout_kind,
        "memcpy_us": memcpy, "lerp_us": lerp,
    }  # fmt: skip
    memcpy_gbps = 8 * n / (memcpy * 1e-6) / 1e9
    for method in ("ema", "bema"):
        weights = AveragedWeights(AveragerSpec(method=method, update_every=1), layout, where)
        weights.step(0)

        def update(w: AveragedWeights = weights, step: list[int] = [0]) -> None:  # noqa: B006
            step[0] += 1
            w.step(step[0])

        us = time_us(update, opts.iters, opts.warmup, cuda)
        moved = (4 + params[0].element_size() + 4) * n  # read the shadow and the live weight, write the shadow
        result[f"{method}_us"] = us
        result[f"{method}_vs_lerp"] = us / lerp
        result[f"{method}_bandwidth_vs_memcpy"] = moved / (us * 1e-6) / 1e9 / memcpy_gbps
        if method == "ema":  # the same without the non-finite check: what its host sync adds to one update
            with finite_check_off():
                unchecked = time_us(update, opts.iters, opts.warmup, cuda)
            result["ema_unchecked_us"] = unchecked
            result["ema_unchecked_vs_lerp"] = unchecked / lerp
            result["ema_unchecked_bandwidth_vs_memcpy"] = moved / (unchecked * 1e-6) / 1e9 / memcpy_gbps
        del weights
        free_memory(opts)
    del params, layout
    free_memory(opts)
    return result


def section_update(opts: argparse.Namespace) -> dict[str, Any]:
    scale = 8 if opts.cpu else 1
    shape = {k: max(v // scale, 1) if k in ("hidden", "inter", "heads", "kv") else v for k, v in LLAMA_1B.items()}
    full = full_shapes(**shape, vocab=LLAMA_1B_VOCAB // scale)
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for layout_kind in ("contiguous", "separate"):
            cases.append(("lora", update_case([s for _, s in lora_shapes(scale)], dtype, layout_kind, opts)))
        cases.append(("full", update_case(full, dtype, "separate", opts)))
    log(f"{'setup':<5} {'live':<9} {'layout':<11} {'M elems':>8} {'memcpy µs':>10} {'lerp µs':>8} {'ema µs':>8} "
        f"{'ema/lerp':>8} {'bema µs':>8} {'bema/lerp':>9} {'ema bw/memcpy':>13} {'unchecked ema/lerp, bw':>23}")  # fmt: skip
    for setup, c in cases:
        log(
            f"{setup:<5} {c['live_dtype']:<9} {c['layout']:<11} {c['elements'] / 1e6:>8.2f} {c['memcpy_us']:>10.1f} "
            f"{c['lerp_us']:>8.1f} {c['ema_us']:>8.1f} {c['ema_vs_lerp']:>8.2f} {c['bema_us']:>8.1f} "
            f"{c['bema_vs_lerp']:>9.2f} {c['ema_bandwidth_vs_memcpy']:>13.2f} "
            f"{c['ema_unchecked_vs_lerp']:>16.2f}, {c['ema_unchecked_bandwidth_vs_memcpy']:.2f}"
        )
    return {"scale": scale, "cases": [{"setup": s, **c} for s, c in cases]}


# ---------------------------------------------------------------------------------- section: steps
def llama(opts: argparse.Namespace, vocab: int, dtype: torch.dtype, **shape: int) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
        head_dim=shape["head_dim"], max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device(opts)):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def token_dataset(rows: int, length: int, vocab: int) -> Any:
    from datasets import Dataset

    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def sft_args(out: str, opts: argparse.Namespace, steps: int, batch: int, length: int, lr: float) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        bf16=on_cuda(opts), use_cpu=not on_cuda(opts), max_length=length, report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=1_000_000, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        gradient_checkpointing=False,
    )  # fmt: skip


class StepClock:
    """Step time from ``on_step_begin`` to the end of ``on_step_end`` (the last callback: after every other one),
    CUDA events on the GPU (read once at the end), wall clock on the CPU; and the host seconds spent in the
    hooks of the callbacks given to :meth:`watch`."""

    def __init__(self, cuda: bool) -> None:
        from transformers import TrainerCallback

        self.cuda = cuda
        self.marks: list[tuple[Any, Any]] = []
        self.callback_s: list[float] = []
        self._in_step = 0.0
        clock = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._in_step = 0.0
                clock._begin = clock._mark()

            def on_step_end(self, args, state, control, **kwargs):
                clock.marks.append((clock._begin, clock._mark()))
                clock.callback_s.append(clock._in_step)

        self.callback = Timer()

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def watch(self, callbacks: list[Any]) -> None:
        for callback in callbacks:
            for hook in ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"):
                original = getattr(callback, hook)

                def timed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        self._in_step += time.perf_counter() - t0

                setattr(callback, hook, timed)

    def step_seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [begin.elapsed_time(end) / 1e3 for begin, end in self.marks]
        return [end - begin for begin, end in self.marks]


def variant_callbacks(variant: str) -> tuple[list[Any], bool]:
    from trl_ema_plugin import SelfDistillationCallback, WeightAveragingCallback
    from trl_ema_plugin.distillation.chunked import CHUNK_ELEMENTS

    quiet = dict(eval=False, export_at_end=False)

    def bema() -> Any:
        return WeightAveragingCallback(method="bema", update_every=1, **quiet)

    def distilled(chunk_elements: int = CHUNK_ELEMENTS, **options: Any) -> tuple[list[Any], bool]:
        teacher = SelfDistillationCallback(lambda_=0.5, **options)
        teacher.chunk_elements = chunk_elements
        return [bema(), teacher], True

    averagers = [
        {"name": "ema_99", "method": "ema", "decay": 0.99},
        {"name": "ema_999", "method": "ema", "decay": 0.999},
        {"name": "bema", "method": "bema", "update_every": 1},
        {"name": "dema", "method": "dema", "update_every": 1},
    ]
    built: dict[str, Callable[[], tuple[list[Any], bool]]] = {
        "none": lambda: ([], False),
        PACKED: lambda: ([], False),
        "ema": lambda: ([WeightAveragingCallback(method="ema", **quiet)], False),
        "bema": lambda: ([bema()], False),
        NO_CHECK: lambda: ([bema()], False),
        "4 averagers": lambda: ([WeightAveragingCallback(averagers=averagers, **quiet)], False),
        "ema offload": lambda: ([WeightAveragingCallback(method="ema", offload=True, **quiet)], False),
        "bema + distill": distilled,
        "bema + distill every 4": lambda: distilled(distill_every=4),
        # 128 MiB of fp32 logits per chunk instead of 32: fewer, larger kernels
        "bema + distill, chunks x4": lambda: distilled(chunk_elements=4 * CHUNK_ELEMENTS),
        "bema + distill (liger)": lambda: distilled(kernel="liger"),
    }
    return built[variant]()


@contextmanager
def finite_check_off(active: bool = True) -> Iterator[None]:
    """The non-finite check of θ_t replaced by ``True`` while ``active``: what its host sync costs."""
    from trl_ema_plugin.shadow.finite import FiniteCheck

    original = FiniteCheck.__call__
    if active:
        FiniteCheck.__call__ = lambda self, theta: True  # type: ignore[method-assign]
    try:
        yield
    finally:
        FiniteCheck.__call__ = original  # type: ignore[method-assign]


def peak_bytes(opts: argparse.Namespace, fn: Callable[[], Any]) -> int | None:
    """Peak CUDA memory allocated during ``fn()``; None on the CPU (a process's resident memory, reused by its
    allocator from one run to the next, does not show a run's peak: ``bench_distillation.py`` measures the
    distillation term's own peak there)."""
    if not on_cuda(opts):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def train_variant(variant: str, opts: argparse.Namespace, shape: dict[str, int], dataset: Any) -> dict[str, Any]:
    from peft import LoraConfig
    from trl import SFTTrainer

    from trl_ema_plugin import attach
    from trl_ema_plugin.demos.tiny import tiny_tokenizer

    free_memory(opts)
    model = llama(opts, opts.vocab, torch.bfloat16 if on_cuda(opts) else torch.float32, **shape)
    callbacks, needs_attach = variant_callbacks(variant)
    clock = StepClock(on_cuda(opts))
    clock.watch(callbacks)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model, args=sft_args(out, opts, opts.steps, opts.batch, opts.seq, 1e-4), train_dataset=dataset,
            processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            callbacks=[*callbacks, clock.callback],
        )  # fmt: skip
        if needs_attach:
            attach(trainer)
        if variant == PACKED:
            from trl_ema_plugin.integrations.parallel import build_layout, pack_adapter_weights
            from trl_ema_plugin.shadow.selection import trainable_parameters

            layout = build_layout(trainable_parameters(trainer.model), trainer.args, model=trainer.model)
            assert pack_adapter_weights(layout, trainer.model, trainer.args)
        with finite_check_off(variant == NO_CHECK):
            peak = peak_bytes(opts, trainer.train)
    steps = clock.step_seconds()[opts.skip :]
    callback_s = clock.callback_s[opts.skip :]
    runner = next((getattr(cb, "runner", None) for cb in callbacks if getattr(cb, "runner", None)), None)
    del trainer, model, callbacks
    free_memory(opts)
    return {
        "times": steps,
        "callback_s": callback_s,
        "peak_bytes": peak,
        "schedule": getattr(runner, "schedule", None),
    }


def interleave(variants: list[str], run: Callable[[str], dict[str, Any]], opts: argparse.Namespace) -> dict:
    """Every variant in turn, ``opts.repeats`` rounds, so that drift hits them alike, after one untimed run of the
    first (the first run of a process pays for warm-up that later runs do not); the errors are kept."""
    run(variants[0])
    samples: dict[str, dict[str, Any]] = {v: {"times": [], "callback_s": [], "peak_bytes": []} for v in variants}
    errors: dict[str, str] = {}
    for _ in range(opts.repeats):
        for variant in variants:
            if variant in errors:
                continue
            try:
                result = run(variant)
            except Exception as exc:
                log(traceback.format_exc())
                errors[variant] = f"{type(exc).__name__}: {exc}"
                continue
            for key in ("times", "callback_s"):
                samples[variant][key] += result[key]
            samples[variant].setdefault("round_medians_ms", []).append(statistics.median(result["times"]) * 1e3)
            samples[variant]["peak_bytes"].append(result["peak_bytes"])
            samples[variant]["schedule"] = result["schedule"]
    return {"samples": samples, "errors": errors}


def summarize(variants: list[str], data: dict[str, Any]) -> list[dict[str, Any]]:
    samples = data["samples"]
    base = samples["none"]["times"]
    base_ms = statistics.median(base) * 1e3 if base else None
    base_peak = max((p for p in samples["none"]["peak_bytes"] if p is not None), default=None)
    rows = []
    for variant in variants:
        times = samples[variant]["times"]
        peaks = [p for p in samples[variant]["peak_bytes"] if p is not None]
        median = statistics.median(times) * 1e3 if times else None
        callback = statistics.median(samples[variant]["callback_s"]) * 1e3 if samples[variant]["callback_s"] else None
        peak = max(peaks) if peaks else None
        rows.append({
            "variant": variant, "schedule": samples[variant].get("schedule"), "median_step_ms": median,
            "ratio": median / base_ms if median is not None and base_ms else None,
            "callback_ms": callback, "callback_share": callback / median if callback is not None and median else None,
            "peak_gib": peak / 2**30 if peak is not None else None,
            "peak_delta_gib": (peak - base_peak) / 2**30 if peak is not None and base_peak is not None else None,
            "steps": len(times), "error": data["errors"].get(variant),
            "p10_p90_ms": [q * 1e3 for q in statistics.quantiles(times, n=10)[::8]] if len(times) > 1 else None,
            "round_medians_ms": samples[variant].get("round_medians_ms"),
        })  # fmt: skip
    log(f"{'variant':<26} {'runs on':<8} {'step ms':>9} {'ratio':>7} {'callbacks ms':>13} {'share':>7} "
        f"{'peak GiB':>9} {'Δ GiB':>7} {'steps':>6}")  # fmt: skip

    def cell(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        log(
            f"{r['variant']:<26} {r['schedule'] or '-':<8} {cell(r['median_step_ms'], '.2f'):>9} "
            f"{cell(r['ratio'], '.3f'):>7} {cell(r['callback_ms'], '.3f'):>13} {cell(r['callback_share'], '.4f'):>7} "
            f"{cell(r['peak_gib'], '.2f'):>9} {cell(r['peak_delta_gib'], '+.2f'):>7} {r['steps']:>6}"
            + (f"  p10-p90 {r['p10_p90_ms'][0]:.1f}-{r['p10_p90_ms'][1]:.1f}" if r["p10_p90_ms"] else "")
            + (f", rounds {' / '.join(f'{m:.1f}' for m in r['round_medians_ms'])}" if r["round_medians_ms"] else "")
            + (f"  error: {r['error']}" if r["error"] else "")
        )
    return rows


def section_steps(opts: argparse.Namespace) -> dict[str, Any]:
    shape = dict(hidden=64, layers=2, inter=128, heads=4, kv=2, head_dim=16) if opts.cpu else dict(LLAMA_1B)
    dataset = token_dataset(opts.steps * opts.batch + opts.batch, opts.seq, opts.vocab)
    variants = ["none", PACKED, "ema", "bema", NO_CHECK, "4 averagers", "ema offload", "bema + distill"]
    variants += ["bema + distill every 4", "bema + distill, chunks x4", "bema + distill (liger)"]
    variants = [v for v in variants if v == "none" or not opts.variants or v in opts.variants.split(",")]
    log(f"LoRA r=16 all-linear, Llama {shape}, vocabulary {opts.vocab}, batch {opts.batch} x {opts.seq}, "
        f"{opts.steps} steps per run (first {opts.skip} dropped), {opts.repeats} interleaved rounds")  # fmt: skip
    data = interleave(variants, lambda v: train_variant(v, opts, shape, dataset), opts)
    return {"model": shape, "rows": summarize(variants, data)}


# ------------------------------------------------------------------------------------ section: trl
def section_trl(opts: argparse.Namespace) -> dict[str, Any]:
    from trl import BEMACallback, SFTTrainer

    from trl_ema_plugin import WeightAveragingCallback
    from trl_ema_plugin.demos.tiny import tiny_tokenizer

    shape = (
        dict(hidden=64, layers=2, inter=128, heads=4, kv=2, head_dim=16)
        if opts.cpu
        else dict(hidden=1024, layers=8, inter=4096, heads=16, kv=8, head_dim=64)
    )
    dataset = token_dataset(opts.steps * opts.batch + opts.batch, opts.seq, opts.vocab)
    where = device(opts).type
    builders: dict[str, Callable[[], list[Any]]] = {
        "none": lambda: [],
        "ours bema": lambda: [WeightAveragingCallback(method="bema", update_every=1, eval=False, export_at_end=False)],
        "trl BEMACallback (default)": lambda: [BEMACallback(update_freq=1)],
    }
    if "device" in inspect.signature(BEMACallback.__init__).parameters:  # TRL >= 1.x: where its copies live
        builders[f"trl BEMACallback (device={where})"] = lambda: [BEMACallback(update_freq=1, device=where)]

    def run(variant: str) -> dict[str, Any]:
        free_memory(opts)
        model = llama(opts, opts.vocab, torch.float32, **shape)
        callbacks = builders[variant]()
        clock = StepClock(on_cuda(opts))
        clock.watch(callbacks)
        with tempfile.TemporaryDirectory() as out:
            trainer = SFTTrainer(
                model=model, args=sft_args(out, opts, opts.steps, opts.batch, opts.seq, 1e-5), train_dataset=dataset,
                processing_class=tiny_tokenizer(), callbacks=[*callbacks, clock.callback],
            )  # fmt: skip
            peak = peak_bytes(opts, trainer.train)
        result = {
            "times": clock.step_seconds()[opts.skip :], "callback_s": clock.callback_s[opts.skip :],
            "peak_bytes": peak, "schedule": getattr(getattr(callbacks[0], "runner", None), "schedule", None)
            if callbacks else None,
        }  # fmt: skip
        del trainer, model, callbacks
        free_memory(opts)
        return result

    variants = list(builders)
    params = sum(p.numel() for p in llama(opts, opts.vocab, torch.float32, **shape).parameters()) / 1e6
    log(f"full fine-tuning of a {params:.2f} M-parameter Llama {shape} (fp32 weights, bf16 autocast on CUDA)")
    data = interleave(variants, run, opts)
    return {"model": shape, "params_m": params, "rows": summarize(variants, data)}


# ------------------------------------------------------------------------------------------ table
def table_markdown(opts: argparse.Namespace) -> str:
    """The issue's table with the values of this run (``-`` where a section failed or did not run)."""
    where = "CPU (--cpu, small shapes)" if not on_cuda(opts) else RESULTS["meta"]["device"]
    update = {(c["setup"], c["live_dtype"], c["layout"]): c for c in RESULTS.get("update", {}).get("cases", [])}
    steps = {r["variant"]: r for r in RESULTS.get("steps", {}).get("rows", [])}
    trl = {r["variant"]: r for r in RESULTS.get("trl", {}).get("rows", [])}

    def ratio(row: dict[str, Any] | None) -> str:
        return "-" if not row or row.get("ratio") is None else f"{row['ratio']:.3f}"

    def upd(key: tuple[str, str, str]) -> str:
        c = update.get(key)
        if not c:
            return "-"
        return (
            f"{c['ema_us']:.1f} µs = {c['ema_vs_lerp']:.2f}x lerp (BEMA {c['bema_us']:.1f} µs = {c['bema_vs_lerp']:.2f}x;"
            f" EMA without the non-finite check {c['ema_unchecked_vs_lerp']:.2f}x)"
        )

    lora = next((c for c in update.values() if c["setup"] == "lora"), None)
    full_bf16 = update.get(("full", "bfloat16", "separate"))
    distill = steps.get("bema + distill")
    lines = [
        f"| what ({where}) | measured |",
        "|---|---|",
        "| flat fp32 lerp / memcpy of the adapter's elements | "
        + (f"{lora['lerp_us']:.1f} µs / {lora['memcpy_us']:.1f} µs |" if lora else "- |"),
        f"| one EMA update through `AveragedWeights.step`, bf16 live weights (one flat adapter) | "
        f"{upd(('lora', 'bfloat16', 'contiguous'))} |",
        f"| the same, separate tensors | {upd(('lora', 'bfloat16', 'separate'))} |",
        f"| the same with fp32 live weights (one flat adapter) | {upd(('lora', 'float32', 'contiguous'))} |",
        "| full fine-tuning shadow, bf16 live weights: update bandwidth / memcpy bandwidth | "
        + (
            f"{full_bf16['ema_bandwidth_vs_memcpy']:.2f}x (without the non-finite check "
            f"{full_bf16['ema_unchecked_bandwidth_vs_memcpy']:.2f}x) |"
            if full_bf16
            else "- |"
        ),
        f"| step time vs no averaging: one averager (bema) | {ratio(steps.get('bema'))} |",
        f"| the same without the non-finite check (its host sync) | {ratio(steps.get(NO_CHECK))} |",
        f"| four averagers | {ratio(steps.get('4 averagers'))} |",
        f"| `offload=True` (ema) | {ratio(steps.get('ema offload'))} |",
        "| bema + `SelfDistillationCallback` | "
        + (
            f"{ratio(distill)}, peak {distill['peak_delta_gib']:+.2f} GiB |"
            if distill and distill.get("peak_delta_gib") is not None
            else f"{ratio(distill)} |"
        ),
        f"| bema + `SelfDistillationCallback(distill_every=4)` | {ratio(steps.get('bema + distill every 4'))} |",
        f"| bema + `SelfDistillationCallback`, 4x larger chunks | {ratio(steps.get('bema + distill, chunks x4'))} |",
        f"| bema + `SelfDistillationCallback(kernel='liger')` | {ratio(steps.get('bema + distill (liger)'))} |",
        f"| no averaging, the adapter laid out flat as the callback lays it out | {ratio(steps.get(PACKED))} |",
        "| full fine-tuning: ours / TRL `BEMACallback(device=...)` / TRL default | "
        + " / ".join(
            ratio(trl.get(k))
            for k in ("ours bema", next((k for k in trl if "device=" in k), ""), "trl BEMACallback (default)")
        )
        + " |",
    ]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with small shapes (validates the script)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench_gpu")
    parser.add_argument("--sections", default="update,steps,trl")
    parser.add_argument("--iters", type=int, help="timed calls per update case (default 50; --cpu 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--vocab", type=int, help="vocabulary of the trained models (default 32000; --cpu 512)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (default 30; --cpu 8)")
    parser.add_argument("--skip", type=int, help="first steps of a run not timed (default 5; --cpu 2)")
    parser.add_argument("--batch", type=int, help="default 8; --cpu 4")
    parser.add_argument("--seq", type=int, help="default 512; --cpu 64")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the training variants")
    parser.add_argument("--variants", default="", help="comma-separated training variants to run (default: all)")
    opts = parser.parse_args()
    defaults = dict(iters=(30, 50), vocab=(512, 32000), steps=(8, 30), skip=(2, 5), batch=(4, 8), seq=(64, 512))
    for key, (small, full) in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, small if opts.cpu else full)
    if opts.cpu:
        torch.set_num_threads(1)
    out = Path(opts.out)
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except Exception:
        log(traceback.format_exc())
    RESULTS["meta"] = {**versions(opts), "args": vars(opts), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"trl-ema-plugin benchmark on {RESULTS['meta']['device']}: " + ", ".join(
        f"{k} {v}" for k, v in RESULTS["meta"].items() if k in ("torch", "cuda", "transformers", "trl", "peft")
    ))  # fmt: skip
    sections = {"update": section_update, "steps": section_steps, "trl": section_trl}
    failed = []
    for name in [s.strip() for s in opts.sections.split(",") if s.strip()]:
        log(f"\n=== {name}")
        start = time.monotonic()
        try:
            RESULTS[name] = sections[name](opts)
        except Exception as exc:  # one section's failure keeps the others
            log(traceback.format_exc())
            RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        RESULTS.setdefault("seconds", {})[name] = round(time.monotonic() - start, 1)
        free_memory(opts)
        write_results(out)
    table = table_markdown(opts)
    (out / "table.md").write_text(table)
    log("\n" + table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
