"""What the evidence commands share (``benchmarks/evidence.py``, ``benchmarks/evidence_grpo.py``): the scale and
folder options, the process setup, and the report step."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def add_scale_arguments(parser: argparse.ArgumentParser, out_stem: str, docs_help: str) -> None:
    """``--full | --smoke | --tiny``, ``--out`` (default ``experiments_out/<out_stem>-<scale>``) and ``--docs``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="scale", action="store_const", const="full", help="the documented run (default)")
    mode.add_argument("--smoke", dest="scale", action="store_const", const="smoke", help="SmolLM2, 2 steps per run")
    mode.add_argument("--tiny", dest="scale", action="store_const", const="tiny", help="tiny random model, seconds")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default experiments_out/{out_stem}-<scale>)"
    )
    parser.add_argument("--docs", type=Path, default=None, help=f"{docs_help} (default: docs/ for --full)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--report-only``, ``--no-progress`` and ``--threads``."""
    parser.add_argument("--report-only", action="store_true", help="rebuild plots and table from <out>, train nothing")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is faster on a machine shared with other jobs)"
    )


def resolve_folders(args: argparse.Namespace, out_stem: str) -> argparse.Namespace:
    """Fill the defaults of ``scale`` (full), ``out`` and ``docs`` (``docs/`` for --full, else ``<out>/docs``)."""
    args.scale = args.scale or "full"
    args.out = args.out or Path("experiments_out") / f"{out_stem}-{args.scale}"
    args.docs = args.docs or (Path("docs") if args.scale == "full" else args.out / "docs")
    return args


def prepare_process(threads: int | None) -> None:
    """Offline hub, no tokenizer threads, and ``threads`` torch CPU threads when given."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        import torch

        torch.set_num_threads(threads)


def report(
    write: Callable[[list[dict[str, Any]], Path, str], Iterable[Path]],
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    script: str,
    full_command: str,
) -> int:
    """Write the report of ``results`` and say what was written; the command shown is ``full_command`` for --full."""
    command = full_command if args.scale == "full" else f"python {script} --{args.scale}"
    for path in write(results, args.docs, command):
        print(f"wrote {path}")
    print(f"{len(results)} finished run(s) in {args.out}")
    return 0


def run_or_report(
    argv: list[str] | None,
    description: str,
    folder: tuple[str, Path],
    run: Callable[[argparse.Namespace], Any],
    write_report: Callable[[Path], str],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line of a resumable study: ``run`` (trains or evaluates what is missing) or ``report`` (prints its
    tables); ``folder`` is the results folder's flag and default (``args.folder``), ``--threads`` defaults to 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("command", choices=("run", "report"))
    flag, default = folder
    parser.add_argument(flag, dest="folder", type=Path, default=default, help="results (outside git)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    prepare_process(args.threads)
    if args.command == "run":
        run(args)
    else:
        print(write_report(args.folder))
    return 0
