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
import os
import sys
from pathlib import Path

from .report import write_report
from .runner import scale_named
from .studies import STUDIES, load_results, run_studies

FULL_COMMAND = "python benchmarks/evidence.py --full --threads 1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EMA/BEMA evidence on SmolLM2-135M-Instruct and stdlib code (CPU).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="scale", action="store_const", const="full", help="the documented run (default)")
    mode.add_argument("--smoke", dest="scale", action="store_const", const="smoke", help="SmolLM2, 2 steps per run")
    mode.add_argument("--tiny", dest="scale", action="store_const", const="tiny", help="tiny random model, seconds")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default experiments_out/evidence-<scale>)"
    )
    parser.add_argument(
        "--docs", type=Path, default=None, help="where plots and results.md go (default: docs/ for --full)"
    )
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {','.join(STUDIES)}")
    parser.add_argument("--report-only", action="store_true", help="rebuild plots and table from <out>, train nothing")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is faster on a machine shared with other jobs)"
    )
    args = parser.parse_args(argv)
    args.scale = args.scale or "full"
    args.out = args.out or Path("experiments_out") / f"evidence-{args.scale}"
    args.docs = args.docs or (Path("docs") if args.scale == "full" else args.out / "docs")
    args.studies = tuple(s.strip() for s in args.studies.split(",") if s.strip())
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
        run_studies(scale, args.out, args.studies, show_progress=not args.no_progress)
    results = [r for r in load_results(args.out) if r["study"] in args.studies]
    command = FULL_COMMAND if args.scale == "full" else f"python benchmarks/evidence.py --{args.scale}"
    for path in write_report(results, args.docs, command):
        print(f"wrote {path}")
    print(f"{len(results)} finished run(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
