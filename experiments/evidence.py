"""Command line of the evidence studies (also ``benchmarks/evidence.py``).

    python benchmarks/evidence.py --full --threads 1     # SmolLM2-135M, about an hour on a shared 2-core CPU
    python benchmarks/evidence.py --smoke                # SmolLM2, 2 steps per run: does it work?
    python benchmarks/evidence.py --tiny                 # tiny random Llama, seconds per run (CI)
    python benchmarks/evidence.py --full --report-only   # rebuild docs/ from the saved runs

Runs are resumable: each finished run is ``<out>/runs/<run id>.json`` and is skipped next time.
``--full`` writes its plots and ``results.md`` to ``docs/``; the other scales to ``<out>/docs``.
"""

from __future__ import annotations

import argparse
import sys

from .cli import add_run_arguments, add_scale_arguments, prepare_process, report, resolve_folders
from .report import write_report
from .runner import scale_named
from .studies import STUDIES, load_results, run_studies

FULL_COMMAND = "python benchmarks/evidence.py --full --threads 1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EMA/BEMA evidence on SmolLM2-135M-Instruct and stdlib code (CPU).")
    add_scale_arguments(parser, "evidence", "where plots and results.md go")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {','.join(STUDIES)}")
    add_run_arguments(parser)
    args = resolve_folders(parser.parse_args(argv), "evidence")
    args.studies = tuple(s.strip() for s in args.studies.split(",") if s.strip())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process(args.threads)
    scale = scale_named(args.scale)
    if not args.report_only:
        run_studies(scale, args.out, args.studies, show_progress=not args.no_progress)
    results = [r for r in load_results(args.out) if r["study"] in args.studies]
    return report(write_report, results, args, "benchmarks/evidence.py", FULL_COMMAND)


if __name__ == "__main__":
    sys.exit(main())
