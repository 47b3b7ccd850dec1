"""Shadow memory and update time per rank under DeepSpeed ZeRO-2 / ZeRO-3 and PyTorch FSDP2 vs one process
(not a test).

Runs the same SFTTrainer + LoRA training four times on a tiny Llama built in code: one process
without DeepSpeed, then 2 ranks under ZeRO-2 and under ZeRO-3 (``DS_ACCELERATOR=cpu deepspeed
--num_gpus 2`` on a machine without GPUs), and 2 ranks under accelerate's FSDP2 plugin (``torchrun``;
on CPU processes accelerate would drop the plugin and train with DDP, so the run lifts that one
decision with ``tests/fsdp_scripts/accelerate_cpu_fsdp.py``). Each run keeps a BEMA average (2 fp32 buffers) updated
at every step, and prints, per rank: the layout, the averaged elements it owns, the shadow bytes,
and the median time of the averaging callback's ``on_step_end`` (the update; no communication).

    python benchmarks/bench_deepspeed.py                    # ~2-3 minutes on 2 CPU cores
    python benchmarks/bench_deepspeed.py --hidden 1024 --rank 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the 2-rank launchers live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deepspeed_scripts"))  # shared with the tests
sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "tests" / "fsdp_scripts")
)  # fsdp_common (accelerate's FSDP2 plugin on CPU)
from cpu_launch import run_two_ranks, torchrun_two_ranks
from ds_common import cpu_training_args

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ one run (worker)
def worker(out: Path, zero: int | None, hidden: int, lora_rank: int, steps: int, fsdp2: bool = False) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from trl import SFTTrainer

    from trl_ema_plugin import WeightAveragingCallback
    from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

    class TimedAveraging(WeightAveragingCallback):
        """Times the update done in on_step_end."""

        durations: list[float]

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            super().on_step_end(*args, **kwargs)
            self.durations.append(time.perf_counter() - start)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, seed=0, hidden_size=hidden)
    model = get_peft_model(
        model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", lora_dropout=0.0)
    )
    averaging = TimedAveraging(method="bema", update_every=1, eval=False, export_at_end=False, save_checkpoints=False)
    averaging.durations = []
    fsdp: dict[str, Any] = {}
    if fsdp2:
        from fsdp_common import trainer_fsdp2_args

        fsdp = trainer_fsdp2_args()
    args = cpu_training_args(
        str(out / "run"), zero=zero, max_steps=steps, per_device_train_batch_size=8 // world_size,
        learning_rate=1e-3, max_length=64, logging_steps=steps, **fsdp,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=tiny_sft_dataset(8 * steps),
        processing_class=tokenizer,
        callbacks=[averaging],
    )
    trainer.train()
    weights = averaging.primary
    mine = {
        "layout": type(weights.layout).__name__,
        "owned": sum(weights.layout.local_sizes()),
        "full": weights.layout.full_numel(),
        "shadow_bytes": weights.memory_bytes(),
        "update_ms": 1000 * statistics.median(averaging.durations[1:] or averaging.durations),
    }
    ranks = [mine]
    if world_size > 1:
        ranks = [None] * world_size
        dist.all_gather_object(ranks, mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(ranks))


# ------------------------------------------------------------------------------- driver
def launch(label: str, zero: int | str | None, options: argparse.Namespace, root: Path) -> list[dict]:
    """``zero``: None (one process), 2 or 3 (DeepSpeed ZeRO stage), or "fsdp2"."""
    out = root / label
    out.mkdir()
    script = [str(Path(__file__).resolve()), "--worker", "--out", str(out)]
    script += ["--hidden", str(options.hidden), "--rank", str(options.rank), "--steps", str(options.steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if zero in (2, 3):
        env.setdefault("DS_ACCELERATOR", "cpu")
    output = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.perf_counter()
    if zero is None:
        result = subprocess.run([sys.executable, *script], **output)
    elif zero == "fsdp2":
        result = torchrun_two_ranks([*script, "--fsdp2"], **output)
    else:
        result = run_two_ranks([*script, "--zero", str(zero)], **output)
    if result.returncode != 0 or not (out / "result.json").is_file():
        raise SystemExit(f"{label} failed:\n{result.stdout[-4000:]}")
    print(f"  {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return json.loads((out / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp2", action="store_true", help=argparse.SUPPRESS)
    options, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank
    if options.worker:
        worker(Path(options.out), options.zero, options.hidden, options.rank, options.steps, options.fsdp2)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("1 process", None), ("ZeRO-2, 2 ranks", 2), ("ZeRO-3, 2 ranks", 3), ("FSDP2, 2 ranks", "fsdp2"))
        for label, zero in runs:
            for rank, r in enumerate(launch(label.split(",")[0].replace(" ", "-"), zero, options, Path(tmp))):
                rows.append((label, rank, r))
    single = rows[0][2]["shadow_bytes"]
    print(
        f"BEMA (θ0 + EMA, fp32), LoRA r={options.rank} on a {options.hidden}-wide 2-layer Llama, {options.steps} steps"
    )
    print(
        f"{'run':<17} {'rank':>4} {'layout':<13} {'owned elements':>19} {'shadow bytes':>13} {'vs 1 proc':>9} {'update ms':>10}"
    )
    for label, rank, r in rows:
        owned = f"{r['owned']:,}/{r['full']:,}"
        ratio = r["shadow_bytes"] / single
        print(
            f"{label:<17} {rank:>4} {r['layout']:<13} {owned:>19} {r['shadow_bytes']:>13,} {ratio:>9.3f} {r['update_ms']:>10.3f}"
        )


if __name__ == "__main__":
    main()
