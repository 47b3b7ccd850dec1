"""Step time and peak memory of EMA-teacher self-distillation, side by side in one run (not a test).

One real ``SFTTrainer`` (tiny Llama, LoRA, BEMA averaging + ``SelfDistillationCallback``) trains a
few steps so that the teacher differs from the student. Then the same batch is run through
``trainer.training_step`` (forward, distillation, backward) followed by an optimizer step, once
per variant, the variants taking turns, so that load from other processes hits them alike:

* ``no distillation``: the trainer's own ``compute_loss`` (the hook unwrapped);
* ``distill (unchunked)``: the term as it was computed before the chunked path (``use_reference_path``):
  a second LM-head projection of every completion token, full-vocabulary fp32 log-probabilities of both;
* ``distill (chunked)`` and ``distill (top-k)``: the hook as it runs now;
* ``distill every n``: its amortised cost, ``(t_without · (n − 1) + t_with) / n``.

Times are CPU seconds of this process with one torch thread (``--threads``), so that other
processes on a shared machine do not distort them; the fastest repetition of each variant is
compared (noise only adds time). The extra time is also given in units of one no-grad forward
of the same batch, the expected cost (the teacher forward, plus the LM-head projection of the
completion tokens). The peak memory of the term is the process's peak resident memory while the
term and its backward run alone on a recorded student forward, above the resident memory before
(Linux; ``--vocab``: a vocabulary as large as a real model's, where the full-vocabulary tensors dominate).
It is the term's alone: a whole step's peak on the CPU is TRL's own loss (its fused LM head builds the
full-vocabulary tensors on the CPU, not on CUDA).

    python benchmarks/bench_distillation.py                 # ~1 minute on 2 CPU cores
    python benchmarks/bench_distillation.py --vocab 32000 --batch 4 --length 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer
from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deepspeed_scripts"))  # shared with the tests
from ds_common import cpu_training_args

warnings.filterwarnings("ignore")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_cpu_bytes(fn: Any) -> int | None:
    """Peak resident memory of this process while ``fn()`` runs, above the resident memory before it (Linux: the
    kernel's high-water mark, reset through ``/proc/self/clear_refs``); None where that is not available.

    Large tensors (the full-vocabulary ones) are mapped and unmapped as they come and go, so the peak shows
    them; small ones may come from memory the allocator already holds."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current resident size
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return max(_status_bytes("VmHWM") - before, 0)


def term_peak(trainer: Any, distillation: Any, hooked: Any, inputs: dict, variant: str, top_k: int) -> int | None:
    """Peak memory of the distillation term alone (forward and backward) on a freshly recorded student forward."""
    from trl_ema_plugin.integrations.trl.student_outputs import label_positions

    distillation.config.top_k = top_k if variant.startswith("distill (top") else None
    distillation.use_reference_path = variant == "distill (unchunked)"
    assert distillation.recorder is not None
    with distillation.recorder.recording():
        hooked.__wrapped__(trainer.model, dict(inputs))  # the trainer's own loss: records the backbone call
    call, positions = distillation.recorder.take(), label_positions(inputs)

    def term() -> None:
        total, _ = distillation._divergence_sum(call, positions.to(call.hidden.device))
        total.backward()

    peak = peak_cpu_bytes(term)
    trainer.model.zero_grad()
    return peak


def _token_dataset(rows: int, length: int, vocab: int) -> Any:
    """Pre-tokenized rows of random ids (SFTTrainer skips tokenization; every token is trained)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(3, vocab, (rows, length), generator=generator).tolist()})


def _build(
    out: str, hidden: int, layers: int, batch: int, length: int, vocab: int | None = None
) -> tuple[Any, SelfDistillationCallback]:
    from peft import LoraConfig

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=0, hidden_size=hidden)
    if layers != model.config.num_hidden_layers or vocab is not None:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        changes = {"num_hidden_layers": layers, **({"vocab_size": vocab} if vocab is not None else {})}
        model = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), **changes}))
    distillation = SelfDistillationCallback(lambda_=0.5, temperature=2.0)
    trainer = SFTTrainer(
        model=model,
        args=cpu_training_args(
            out,
            max_steps=2,
            per_device_train_batch_size=batch,
            learning_rate=1e-3,
            max_length=length,
            logging_steps=1000,
        ),
        train_dataset=tiny_sft_dataset(4 * batch) if vocab is None else _token_dataset(4 * batch, length, vocab),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05),
        callbacks=[
            WeightAveragingCallback(method="bema", update_every=1, eval=False, export_at_end=False),
            distillation,
        ],
    )
    attach(trainer)
    trainer.train()  # sets up the averager and the teacher, and moves them apart
    return trainer, distillation


def _time(fn: Any) -> float:
    """CPU time of ``fn`` in this process: with one torch thread, the work itself, whatever the machine's load."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def compare_step_times(
    hidden: int = 256,
    layers: int = 2,
    batch: int = 8,
    length: int = 128,
    repeats: int = 10,
    top_k: int = 32,
    threads: int = 1,
    vocab: int | None = None,
) -> dict[str, float]:
    """Print the step time and peak memory with and without distillation side by side, and their ratios."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer, distillation = _build(out, hidden, layers, batch, length, vocab)
        model = trainer.model
        model.train()
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        hooked = trainer.compute_loss
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(variant: str) -> None:
            trainer.compute_loss = hooked.__wrapped__ if variant == "no distillation" else hooked
            distillation.config.top_k = top_k if variant.startswith("distill (top") else None
            distillation.use_reference_path = variant == "distill (unchunked)"
            trainer.training_step(model, dict(inputs))
            optimizer.step()
            optimizer.zero_grad()

        def forward() -> None:
            model.eval()
            with torch.no_grad():
                model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            model.train()

        variants = ["no distillation", "distill (unchunked)", "distill (chunked)", f"distill (top-{top_k})"]
        times: dict[str, list[float]] = {v: [] for v in [*variants, "forward"]}
        for _ in range(repeats + 1):  # the first round warms up
            for variant in variants:
                times[variant].append(_time(lambda v=variant: step(v)))
            times["forward"].append(_time(forward))
        peaks = {variant: term_peak(trainer, distillation, hooked, inputs, variant, top_k) for variant in variants[1:]}
        trainer.compute_loss = hooked
        teacher_mib = distillation.teacher.memory_bytes() / 2**20
        completion_tokens = int((inputs["labels"][:, 1:] != -100).sum())

    best = {name: min(values[1:]) for name, values in times.items()}
    median = {name: statistics.median(values[1:]) for name, values in times.items()}
    base, fwd = best["no distillation"], best["forward"]
    best["distill every 4 (amortised)"] = (3 * base + best["distill (chunked)"]) / 4
    median["distill every 4 (amortised)"] = (3 * median["no distillation"] + median["distill (chunked)"]) / 4
    print(
        f"tiny Llama hidden={hidden}, {layers} layers, vocab {model.config.vocab_size}, LoRA r=16 all-linear, "
        f"batch {batch} x {inputs['input_ids'].size(1)} tokens ({completion_tokens} completion tokens), "
        f"{repeats} interleaved repeats, {threads} torch thread(s)"
    )
    print(f"one no-grad forward of the batch: {fwd * 1e3:.1f} CPU ms; teacher adapter: {teacher_mib:.2f} MiB")
    print(
        f"{'variant':<28} {'min step (CPU ms)':>17} {'median (ms)':>12} {'ratio':>7} {'extra (forwards)':>17} "
        f"{'term peak MiB':>14}"
    )
    ratios = {}
    for name in [*variants, "distill every 4 (amortised)"]:
        ratios[name] = best[name] / base
        extra = (best[name] - base) / fwd
        peak = peaks.get(name)
        memory = "" if peak is None else f" {peak / 2**20:>14.1f}"
        print(
            f"{name:<28} {best[name] * 1e3:>17.1f} {median[name] * 1e3:>12.1f} {ratios[name]:>7.3f} {extra:>17.2f}"
            + memory
        )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work itself)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (random token ids); default: the tiny tokenizer's")
    args = parser.parse_args()
    compare_step_times(
        args.hidden, args.layers, args.batch, args.length, args.repeats, args.top_k, args.threads, args.vocab
    )


if __name__ == "__main__":
    main()
