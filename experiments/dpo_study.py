"""Issue 11, study (c) again: does a moving DPO reference change the policy, where the reference matters?

Study (c) trained at β = 0.1 and lr 1e-4: its margins stayed near 0.04, where the DPO weight σ(−margin) is 0.49-0.50
whatever the reference. Here β = 1 and lr 5e-4, so that the fixed reference's margins grow to order 1 within the run
and σ(−margin) depends on the reference (a pilot on seed 100, the tuning seed, checked the margins' growth; it is not
part of the results). Fixed before any of its results was seen:

* **Training**: SmolLM2-135M-Instruct, LoRA r=8, α=16 on q/k/v/o, batch 4, rows of at most 128 tokens,
  :data:`N_TRAIN` pairs picked by the seed, :data:`STEPS` steps with TRL's linear decay, lr :data:`LR`,
  β = :data:`BETA`.
* **References** (:data:`REFERENCES`): TRL's fixed ``"ref"`` adapter; ``"ref"`` kept at the EMA (0.9) or at
  BEMA (TRL's defaults, ``update_every=1``) of the policy, written every step (study (c)'s three).
* **Eval**: reward accuracy and margin on :data:`N_EVAL` held-out pairs picked by the seed, every
  :data:`EVAL_EVERY` steps, against the initial model (comparable across references) and the run's own reference.
* **Seeds** 10-14. A difference to the fixed reference is read as one when every seed has the same sign and the
  mean exceeds twice its standard error.

::

    nice -n 19 python -m experiments.dpo_study run       # resumable; runs are locked as in studies.py
    python -m experiments.dpo_study report               # markdown tables
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cli import run_or_report
from .deltas import paired_summary
from .runner import PRESETS, DPORun, Scale, dpo_data, load_tokenizer, run_dpo
from .studies import REFERENCES, PlannedRun, load_results, run_planned

STUDY = "dpo2"
N_TRAIN, STEPS, N_EVAL, EVAL_EVERY = 128, 24, 32, 8
LR, BETA = 5e-4, 1.0
SEEDS = (10, 11, 12, 13, 14)
DEFAULT_OUT = Path("/work/data/dpo-study")
METRICS = ("accuracy_vs_initial", "margin_vs_initial", "accuracy_vs_ref", "margin_vs_ref")


def study_scale(base: str = "full") -> Scale:
    """The study's sizes on ``base`` (``tiny``: what CI runs)."""
    if base == "tiny":
        return replace(PRESETS["tiny"], name="dpo2-tiny", seeds=(1, 2), dpo_steps=2, dpo_train=8, dpo_eval=4,
                       dpo_eval_every=1, dpo_beta=BETA)  # fmt: skip
    return replace(PRESETS[base], name="dpo2", seeds=SEEDS, dpo_steps=STEPS, dpo_train=N_TRAIN, dpo_eval=N_EVAL,
                   dpo_eval_every=EVAL_EVERY, dpo_learning_rate=LR, dpo_beta=BETA)  # fmt: skip


def plan(scale: Scale) -> list[PlannedRun]:
    """Reference by reference (fixed, BEMA, EMA), each on every seed: a session that runs out of CPU time leaves the
    last reference short of seeds, not every reference."""
    order = ("fixed_ref", "bema_ref", "ema_ref")
    return [
        PlannedRun(STUDY, label, seed, scale.dpo_steps, {"reference": REFERENCES[label]})
        for label in order
        for seed in scale.seeds
    ]


def run_study(out: Path, scale: Scale, show_progress: bool = True) -> list[Path]:
    """Train every planned run that ``out`` does not hold yet (resumable, locked as in :mod:`.studies`)."""
    tokenizer = load_tokenizer(scale)

    def execute(run: PlannedRun, bar: Any) -> dict[str, Any]:
        train = dpo_data(tokenizer, scale, "train", scale.dpo_train, seed=run.seed)
        held_out = dpo_data(tokenizer, scale, "eval", scale.dpo_eval, seed=run.seed)
        spec = DPORun(
            scale, run.seed, run.steps, scale.dpo_eval_every, out / "work" / run.run_id, run.settings["reference"]
        )
        return run_dpo(spec, train, held_out, bar)

    return run_planned(plan(scale), scale, out, execute, show_progress)


def final(result: dict[str, Any], metric: str) -> float:
    return result["curves"][metric][-1][1]


def report(out: Path) -> str:
    results = [r for r in load_results(out) if r["study"] == STUDY]
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by_label.setdefault(r["label"], {})[r["seed"]] = r
    lines = ["| reference | " + " | ".join(f"{m} at the end (mean ± std)" for m in METRICS) + " | CPU s / step |"]
    lines.append("|---" * (len(METRICS) + 2) + "|")
    for label, runs in by_label.items():
        cells = []
        for metric in METRICS:
            values = [final(r, metric) for r in runs.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f} (n={len(values)})")
        seconds = statistics.mean(r["median_cpu_step_seconds"] for r in runs.values())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.2f} |")
    steps = [s for s, _ in results[0]["curves"]["margin_vs_initial"]]
    lines += [
        "",
        f"| reference, mean over seeds | {' | '.join(f'step {s}' for s in steps)} |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for label, runs in by_label.items():
        for metric in ("accuracy_vs_initial", "margin_vs_initial", "margin_vs_ref"):
            means = [statistics.mean(r["curves"][metric][i][1] for r in runs.values()) for i in range(len(steps))]
            lines.append(f"| {label}: {metric} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    fixed = by_label.get("fixed_ref", {})
    for label, runs in by_label.items():
        if label == "fixed_ref":
            continue
        for metric in ("accuracy_vs_initial", "margin_vs_initial"):
            deltas = [final(runs[s], metric) - final(fixed[s], metric) for s in runs if s in fixed]
            if len(deltas) > 1:
                lines.append(f"\n{label} − fixed_ref, {metric} at the end: {paired_summary(deltas, count='above')}")
    for label, runs in by_label.items():
        curves = {s: r["train_loss"] for s, r in runs.items()}
        lines.append(f"\n{label} train loss, last logged per seed: " + ", ".join(
            f"s{s}: {c[-1][1]:.3f}" for s, c in sorted(curves.items()) if c))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_or_report(
        argv, "Issue 11: DPO with a fixed vs a moving reference, β = 1.", ("--out", DEFAULT_OUT),
        lambda args: run_study(args.folder, study_scale()), report,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
