"""Demo: fine-tune SmolLM2-135M-Instruct with LoRA on CPU for a few minutes, with BEMA, and compare.

    python -m experiments.demo            # real model, ~30 steps (a few minutes on 2 cores)
    python -m experiments.demo --tiny     # tiny random model, seconds

Data: prompt = a Python stdlib function's signature + docstring, completion = its body; the
eval functions come from stdlib modules that training never sees. The run keeps a BEMA average
(``update_every=1``) and an EMA (decay 0.9) next to the raw weights, prints the train loss and
the held-out eval loss of each, and saves the averaged adapters in ``<out>/averaged*/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .runner import SFTRun, load_tokenizer, run_sft, scale_named, sft_data

DEMO_AVERAGERS = [
    {"name": "bema", "method": "bema", "update_every": 1},
    {"name": "ema", "method": "ema", "decay": 0.9},
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2 (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; --tiny: 6)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/3)")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out functions in the eval set (default 16)")
    parser.add_argument("--out", type=Path, default=Path("experiments_out") / "demo", help="trainer output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a shared machine)")
    return parser.parse_args(argv)


def format_table(result: dict) -> str:
    """Step | train loss | eval loss of the raw weights and of each average."""
    names = list(result["curves"])
    train = dict(map(tuple, result["train_loss"]))
    header = f"{'step':>5} {'train loss':>11} " + " ".join(f"{'eval ' + n:>13}" for n in names)
    lines = [header]
    for step, _ in result["curves"]["raw"]:
        values = [dict(map(tuple, result["curves"][n])).get(step) for n in names]
        loss = train.get(step)
        cells = " ".join(f"{v:13.4f}" if v is not None else f"{'':13}" for v in values)
        shown = f"{loss:11.4f}" if loss is not None else f"{'—':>11}"
        lines.append(f"{int(step):5d} {shown} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scale = scale_named("tiny" if args.tiny else "full")
    steps = args.steps or (6 if args.tiny else 30)
    eval_every = args.eval_every or max(1, steps // 3)
    n_eval = args.n_eval or (8 if args.tiny else 16)
    scale = dataclasses.replace(scale, n_eval=n_eval)
    tokenizer = load_tokenizer(scale)
    train, eval_set = (
        sft_data(tokenizer, scale, "train", 256 if not args.tiny else 32),
        sft_data(tokenizer, scale, "eval", n_eval),
    )
    print(f"model: {'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct'}, LoRA r={scale.lora_r} on "
          f"{', '.join(scale.target_modules)}; {len(train)} train / {len(eval_set)} held-out stdlib functions; {steps} steps")  # fmt: skip
    run = SFTRun(scale, args.seed, steps, eval_every, args.out, averagers=DEMO_AVERAGERS)
    result = run_sft(run, train, eval_set)
    print()
    print(format_table(result))
    final = {name: curve[-1][1] for name, curve in result["curves"].items()}
    best = min(final, key=final.get)
    print("\nfinal held-out eval loss: " + ", ".join(f"{n} {v:.4f}" for n, v in final.items()) + f" (lowest: {best})")
    print(f"median step {result['median_step_seconds']:.2f} s; averaged adapters in {args.out}/averaged (bema), "
          f"{args.out}/averaged-ema")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
