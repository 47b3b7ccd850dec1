"""The GRPO study (d): fixed reference vs BEMA reference vs BEMA reference + self-distillation, resumable.

    python benchmarks/evidence_grpo.py --full --threads 1     # SmolLM2-135M, about 2 CPU-hours
    python benchmarks/evidence_grpo.py --tiny                 # tiny random Llama, seconds (what CI runs)
    python benchmarks/evidence_grpo.py --full --report-only   # rebuild the table, the plot and docs/evidence.md's block

Every finished run is ``<out>/runs/grpo-<variant>-seed<seed>.json`` and is skipped next time; a running run is
locked by its process id (the conventions of :mod:`experiments.studies`). Protocol: docs/evidence.md, study (d).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .grpo_report import write_grpo_report
from .grpo_runner import GRPORun, GRPOScale, PromptCache, run_grpo, scale_named
from .studies import PlannedRun, _claim, _environment, check_scale, load_results, result_path

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
    """Run every planned run that ``out`` does not hold yet (skipping runs another live process holds)."""
    from tqdm.auto import tqdm

    out = Path(out)
    runs = plan(scale)
    check_scale(out, scale)  # type: ignore[arg-type]
    prompts = PromptCache(scale)
    total = sum(r.steps for r in runs)
    done = sum(r.steps for r in runs if result_path(out, r).exists())
    with tqdm(total=total, initial=done, unit="step", disable=not show_progress, dynamic_ncols=True) as bar:
        for run in runs:
            if result_path(out, run).exists():
                continue
            lock = _claim(out, run)
            if lock is None:
                continue
            try:
                bar.set_postfix_str(run.run_id)
                started = time.time()
                result = execute(run, scale, prompts, out / "work", bar)
                record = {
                    "run_id": run.run_id, "study": run.study, "label": run.label, "seed": run.seed, "steps": run.steps,
                    "settings": run.settings, "scale": scale.as_dict(), "environment": _environment(),
                    "prompts": {split: list(prompts.get(split)["prompt"]) for split in ("train", "eval")},
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.time() - started, **result,
                }  # fmt: skip
                path = result_path(out, run)
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, path)
            finally:
                lock.unlink(missing_ok=True)
    return [result_path(out, r) for r in runs]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GRPO on SmolLM2-135M-Instruct: fixed vs BEMA reference (CPU).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="scale", action="store_const", const="full", help="the documented run (default)")
    mode.add_argument("--smoke", dest="scale", action="store_const", const="smoke", help="SmolLM2, 2 steps per run")
    mode.add_argument("--tiny", dest="scale", action="store_const", const="tiny", help="tiny random model, seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default experiments_out/grpo-<scale>)")
    parser.add_argument("--docs", type=Path, default=None, help="plot and tables (default: docs/ for --full)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the plot and table from <out>")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    args.scale = args.scale or "full"
    args.out = args.out or Path("experiments_out") / f"grpo-{args.scale}"
    args.docs = args.docs or (Path("docs") if args.scale == "full" else args.out / "docs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scale = scale_named(args.scale)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report_only:
        run_study(scale, args.out, show_progress=not args.no_progress)
    results = [r for r in load_results(args.out) if r["study"] == STUDY]
    command = FULL_COMMAND if args.scale == "full" else f"python benchmarks/evidence_grpo.py --{args.scale}"
    for path in write_grpo_report(results, args.docs, command):
        print(f"wrote {path}")
    print(f"{len(results)} finished run(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
