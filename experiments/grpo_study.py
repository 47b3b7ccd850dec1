"""The GRPO study (d): fixed reference vs BEMA reference vs BEMA reference + self-distillation, resumable.

    python benchmarks/evidence_grpo.py --full --threads 1     # SmolLM2-135M, hours on CPU (docs/evidence.md)
    python benchmarks/evidence_grpo.py --tiny                 # tiny random Llama, seconds (what CI runs)
    python benchmarks/evidence_grpo.py --full --report-only   # rebuild the table, the plot and docs/evidence.md's block

Every finished run is ``<out>/runs/grpo-<variant>-seed<seed>.json`` and is skipped next time; a running run is
locked by its process id (the conventions of :mod:`experiments.studies`). Protocol: docs/evidence.md, study (d).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .cli import add_run_arguments, add_scale_arguments, prepare_process, report, resolve_folders
from .grpo_report import write_grpo_report
from .grpo_runner import GRPORun, GRPOScale, PromptCache, run_grpo, scale_named
from .studies import PlannedRun, load_results, run_planned

STUDY = "grpo"
FULL_COMMAND = "python benchmarks/evidence_grpo.py --full --threads 1"
#: the reference of the two moving-reference variants: BEMA at TRL's defaults, updated and written every step
BEMA_REFERENCE = {"method": "bema", "update_every": 1, "ref_update_every": 1}


def variants(scale: GRPOScale) -> dict[str, dict[str, Any]]:
    """Label → settings, in execution order; ``initial`` evaluates the untrained model only."""
    return {
        "initial": {"steps": 0},
        "fixed_ref": {},
        "bema_ref": {"reference": BEMA_REFERENCE},
        "bema_ref_sd": {"reference": BEMA_REFERENCE, "distillation": {"lambda_": scale.distill_lambda}},
    }


def plan(scale: GRPOScale) -> list[PlannedRun]:
    return [
        PlannedRun(STUDY, label, scale.seed, settings.get("steps", scale.steps), settings)
        for label, settings in variants(scale).items()
    ]


def execute(run: PlannedRun, scale: GRPOScale, prompts: PromptCache, work: Path, progress: Any = None) -> dict:
    spec = GRPORun(
        scale, run.steps, work / run.run_id, reference=run.settings.get("reference"),
        distillation=run.settings.get("distillation"),
    )  # fmt: skip
    return run_grpo(spec, prompts.get("train"), prompts.get("eval"), progress)


def run_study(scale: GRPOScale, out: str | os.PathLike[str], show_progress: bool = True) -> list[Path]:
    """Run every planned run that ``out`` does not hold yet (skipping runs another live process holds); each record
    also lists the training and held-out prompts."""
    out = Path(out)
    prompts = PromptCache(scale)

    def execute_run(run: PlannedRun, bar: Any) -> dict[str, Any]:
        result = execute(run, scale, prompts, out / "work", bar)
        return {"prompts": {split: list(prompts.get(split)["prompt"]) for split in ("train", "eval")}, **result}

    return run_planned(plan(scale), scale, out, execute_run, show_progress)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GRPO on SmolLM2-135M-Instruct: fixed vs BEMA reference (CPU).")
    add_scale_arguments(parser, "grpo", "where the plot and results_grpo.md go")
    add_run_arguments(parser)
    return resolve_folders(parser.parse_args(argv), "grpo")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process(args.threads)
    scale = scale_named(args.scale)
    if not args.report_only:
        run_study(scale, args.out, show_progress=not args.no_progress)
    results = [r for r in load_results(args.out) if r["study"] == STUDY]
    return report(write_grpo_report, results, args, "benchmarks/evidence_grpo.py", FULL_COMMAND)


if __name__ == "__main__":
    sys.exit(main())
