"""Issue 11, study (b) again: does self-distillation from an averaged teacher help a low-data LoRA run?

Study (b) ran one seed at its defaults (λ = 0.5, τ = 1) and could not tell the students apart. This study sweeps
λ, τ and the teacher's averager on one tuning seed, then replicates the best setting against plain LoRA on five
fresh seeds, each with its own sample of train and eval functions. Fixed before any of its results was seen:

* **Training** (study (b)'s, with half the data for twice the epochs, so that a regulariser has something to do):
  SmolLM2-135M-Instruct, LoRA r=8, α=16 on q/k/v/o, lr 2e-4 with TRL's linear decay, batch 4, rows of at most
  128 tokens; :data:`N_TRAIN` train functions for :data:`STEPS` steps (6 epochs), picked by the seed.
* **Eval**: the trainer's ``eval_loss`` (student) and ``eval_<teacher>_loss`` (the teacher itself) on
  :data:`N_EVAL` held-out functions picked by the seed, every :data:`EVAL_EVERY` steps.
* **Screen** (seed 100): plain LoRA and the six settings of :func:`screen_settings`, one factor at a time around
  a centre (BEMA κ = 0.3 with α faded to 0 at the last step, the README's recommendation; λ = 0.5, τ = 1).
* **Choice**: the setting with the lowest mean student eval loss over the evaluations after step 0.
* **Replication** (seeds 10-14): plain LoRA and the chosen setting. A difference is read as one when every seed
  has the same sign and the mean exceeds twice its standard error.

::

    nice -n 19 python -m experiments.sd_study run --stage screen      # resumable; locks runs like studies.py
    python -m experiments.sd_study report                             # markdown tables
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cli import run_or_report
from .deltas import paired_summary
from .runner import PRESETS, Scale, SFTRun, load_tokenizer, run_sft, sft_data
from .studies import PlannedRun, load_results, run_planned

STUDY = "sd"
N_TRAIN, STEPS, N_EVAL, EVAL_EVERY = 32, 48, 48, 16
SCREEN_SEED = 100
REPLICATION_SEEDS = (10, 11, 12, 13, 14)
DEFAULT_OUT = Path("/work/data/sd-study")
FADED_BEMA = {"name": "bema", "method": "bema", "update_every": 1, "ema_power": 0.3, "bias_horizon": "max_steps"}
EMA = {"name": "ema", "method": "ema"}
#: the screen's choice (seed 100: the lowest mean student eval loss after step 0, 1.8670 against plain's 1.8674);
#: the replication runs plain LoRA against it
CHOSEN: str | None = "bema_fade_tau2"


def study_scale(base: str = "full") -> Scale:
    """The study's sizes on ``base``: ``seeds[0]`` screens, the others replicate; ``tiny`` is what CI runs."""
    if base == "tiny":
        return replace(PRESETS["tiny"], name="sd-tiny", seeds=(1, 2, 3), n_eval=4, lowdata_train=8, lowdata_steps=2,
                       lowdata_eval_every=1)  # fmt: skip
    return replace(PRESETS[base], name="sd", seeds=(SCREEN_SEED, *REPLICATION_SEEDS), n_eval=N_EVAL,
                   lowdata_train=N_TRAIN, lowdata_steps=STEPS, lowdata_eval_every=EVAL_EVERY)  # fmt: skip


def screen_settings() -> dict[str, dict[str, Any]]:
    """Label → ``{"averagers": [teacher], "distillation": {...}}``: the centre, then one factor changed at a time."""

    def sd(teacher: dict[str, Any], lambda_: float = 0.5, temperature: float = 1.0) -> dict[str, Any]:
        distill = {"teacher": teacher["name"], "lambda_": lambda_, "temperature": temperature}
        return {"averagers": [teacher], "distillation": distill}

    return {
        "bema_fade": sd(FADED_BEMA),
        "bema_fade_lambda0.2": sd(FADED_BEMA, lambda_=0.2),
        "bema_fade_lambda0.9": sd(FADED_BEMA, lambda_=0.9),
        "bema_fade_tau2": sd(FADED_BEMA, temperature=2.0),
        "ema0.9": sd({**EMA, "decay": 0.9}),
        "ema0.98": sd({**EMA, "decay": 0.98}),
    }


def plan(stage: str, scale: Scale, chosen: str | None = CHOSEN) -> list[PlannedRun]:
    steps, (screen_seed, *replication_seeds) = scale.lowdata_steps, scale.seeds
    if stage == "screen":
        labelled = {"plain": {}, **screen_settings()}
        return [PlannedRun(STUDY, label, screen_seed, steps, s) for label, s in labelled.items()]
    if stage == "replication":
        if chosen not in screen_settings():
            raise ValueError(
                f"chosen={chosen!r}: the replication needs the screen's choice, one of {list(screen_settings())}"
            )
        labelled = {"plain": {}, chosen: screen_settings()[chosen]}
        return [PlannedRun(STUDY, label, seed, steps, s) for seed in replication_seeds for label, s in labelled.items()]
    raise ValueError(f"stage={stage!r}; allowed values: screen, replication")


def run_stage(
    stage: str, out: Path, scale: Scale, chosen: str | None = CHOSEN, show_progress: bool = True
) -> list[Path]:
    """Train every run of ``stage`` that ``out`` does not hold yet (resumable, locked as in :mod:`.studies`)."""
    tokenizer = load_tokenizer(scale)

    def execute(run: PlannedRun, bar: Any) -> dict[str, Any]:
        train = sft_data(tokenizer, scale, "train", scale.lowdata_train, seed=run.seed)
        held_out = sft_data(tokenizer, scale, "eval", scale.n_eval, seed=run.seed)
        spec = SFTRun(
            scale, run.seed, run.steps, scale.lowdata_eval_every, out / "work" / run.run_id,
            averagers=run.settings.get("averagers", []), distillation=run.settings.get("distillation"),
        )  # fmt: skip
        return run_sft(spec, train, held_out, bar)

    return run_planned(plan(stage, scale, chosen), scale, out, execute, show_progress)


def student_mean(result: dict[str, Any]) -> float:
    """The student's mean eval loss over the evaluations after step 0."""
    return statistics.mean(v for s, v in result["curves"]["raw"] if s > 0)


def report(out: Path) -> str:
    """Markdown: every run's student curve, and each setting against plain LoRA on the replication seeds."""
    results = [r for r in load_results(out) if r["study"] == STUDY]
    if not results:
        return f"no finished runs in {out}"
    steps = [s for s, _ in results[0]["curves"]["raw"]]
    replication_seeds = set(results[0]["scale"]["seeds"][1:])
    lines = [f"| run | seed | student eval loss at steps {', '.join(map(str, steps))} | mean after 0 | "
             "teacher's own loss at the end | CPU s / step |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(results, key=lambda r: (r["seed"], r["label"] != "plain", r["label"])):
        curve = ", ".join(f"{v:.4f}" for _, v in r["curves"]["raw"])
        teacher = next((k for k in r["curves"] if k != "raw"), None)
        own = f"{r['curves'][teacher][-1][1]:.4f}" if teacher else "—"
        cpu = r["median_cpu_step_seconds"]
        lines.append(f"| {r['label']} | {r['seed']} | {curve} | {student_mean(r):.4f} | {own} | {cpu:.2f} |")
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results:
        if r["seed"] in replication_seeds:
            by_seed.setdefault(r["seed"], {})[r["label"]] = r
    for label in sorted({label for runs in by_seed.values() for label in runs} - {"plain"}):
        pairs = [(runs[label], runs["plain"]) for runs in by_seed.values() if label in runs and "plain" in runs]
        for what, value in (("end", lambda r: r["curves"]["raw"][-1][1]), ("mean after 0", student_mean)):
            deltas = [value(a) - value(b) for a, b in pairs]
            if len(deltas) > 1:
                lines.append(f"\n{label} − plain, {what}: mean {paired_summary(deltas)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def stage_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--stage", choices=("screen", "replication"), default="screen")
        parser.add_argument("--chosen", default=CHOSEN, help="replication: the screen's choice")

    return run_or_report(
        argv, "Issue 11: self-distillation from an averaged teacher, swept.", ("--out", DEFAULT_OUT),
        lambda args: run_stage(args.stage, args.folder, study_scale(), args.chosen), report, stage_arguments,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
