"""The post-hoc EMA options of ``ema-export``: synthesize the EMA of any σ_rel from a run's ``posthoc/`` snapshots.

    ema-export RUN --posthoc-sigma-rel 0.07 -o OUT [--posthoc-step N] [--posthoc-bema-alpha A] [--merge]
    ema-export RUN --posthoc-sweep 0.02 0.05 0.1 0.2 --eval-data eval.jsonl [-o BEST] [--base-model PATH]
    ema-export RUN --list [--posthoc-sigma-rel 0.07]

``RUN`` is the run's ``output_dir`` (or its ``posthoc/`` folder). The export writes a PEFT adapter (the run's
``adapter_config.json``, the synthesized ``adapter_model.safetensors``) and the run's tokenizer files, or with
``--merge`` the base model with the adapter merged in. The sweep loads the base model and the eval rows once,
evaluates each σ_rel (and the raw weights θ_T), prints every loss and the best, and with ``-o`` exports the best.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..averagers.power import check_sigma_rel
from ..posthoc.evaluation import TokenLoss, read_rows
from ..posthoc.model_files import ADAPTER_CONFIG, read_description, write_model_files
from ..posthoc.snapshots import list_snapshots, read_theta0, resolve_posthoc_folder
from ..posthoc.sweep import SweepResult, residual_warning, sweep
from ..posthoc.synthesis import plan_synthesis, synthesize, synthesize_bema
from .export import AveragedFolder, _copy_tokenizer, check_output_folder, merge_into_base

OPTIONS = ("posthoc_sigma_rel", "posthoc_sweep", "posthoc_step", "posthoc_bema_alpha", "eval_data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("post-hoc EMA (from the snapshots in RUN/posthoc/)")
    group.add_argument("--posthoc-sigma-rel", type=float, metavar="S", help="synthesize the EMA of σ_rel S")
    group.add_argument("--posthoc-step", type=int, metavar="N", help="at snapshot step N (default: the last)")
    group.add_argument("--posthoc-bema-alpha", type=float, metavar="A", help="post-hoc BEMA: add A·(θ_T − θ_0)")
    group.add_argument(
        "--posthoc-sweep", type=float, nargs="+", metavar="S", help="evaluate each σ_rel on --eval-data; -o: the best"
    )
    group.add_argument("--eval-data", help="with --posthoc-sweep: JSON lines, {text} or {prompt, completion}")
    group.add_argument("--max-length", type=int, default=512, help="with --posthoc-sweep: tokens per row (512)")
    group.add_argument("--batch-size", type=int, default=8, help="with --posthoc-sweep: rows per forward (8)")


def requested(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a post-hoc EMA (export, sweep)."""
    return any(getattr(args, name) is not None for name in OPTIONS)


# ------------------------------------------------------------------------------- listing
def describe_snapshots(source: str | Path, sigma_rel: float | None = None, step: int | None = None) -> str | None:
    """The snapshots of ``source`` (and the plan of ``sigma_rel``), or None when it holds none."""
    folder = resolve_posthoc_folder(source)
    snapshots = list_snapshots(folder)
    if not snapshots:
        return None
    first = snapshots[0]
    profiles = ", ".join(f"{p.sigma_rel:g} (γ={p.gamma:.2f})" for p in first.profiles)
    lines = [
        f"post-hoc EMA snapshots in {folder}: {len(snapshots)}, averaging from step {first.started_at}, "
        f"sigma_rel {profiles}, {first.dtype}",
        "step\tt\ttheta\tfile",
        *(f"{s.global_step}\t{s.t}\t{'yes' if s.has_theta else 'no'}\t{s.path.name}" for s in snapshots),
    ]
    try:
        lines.append(f"theta0: {read_theta0(folder).path.name}")
    except (FileNotFoundError, ValueError) as exc:
        lines.append(f"theta0: none ({exc})")
    if sigma_rel is not None:
        plan = plan_synthesis(folder, check_sigma_rel(sigma_rel, "--posthoc-sigma-rel"), step)
        lines += [
            f"plan for sigma_rel={plan.sigma_rel:g} (γ={plan.gamma:.3f}) at step {plan.target.global_step}: "
            f"residual {plan.residual:.3e}, sum x before normalising {plan.mass:.6f}, sum |x| {plan.weight_l1:.4f}",
            "step\tsigma_rel\tx",
            *(f"{i.snapshot.global_step}\t{i.profile.sigma_rel:g}\t{i.weight:+.6f}" for i in plan.inputs),
        ]
        message = residual_warning(plan)
        if message:
            lines.append(f"warning: {message}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- export
def synthesized(source: str | Path, sigma_rel: float, step: int | None, bema_alpha: float | None) -> dict[str, Any]:
    """The tensors of σ_rel (post-hoc BEMA with ``bema_alpha``); a poor fit is reported on stderr."""
    sigma_rel = check_sigma_rel(sigma_rel, "--posthoc-sigma-rel")
    _check_alpha(bema_alpha)
    message = residual_warning(plan_synthesis(source, sigma_rel, step))
    if message:
        print(f"ema-export: warning: {message}", file=sys.stderr)
    if bema_alpha:
        return synthesize_bema(source, sigma_rel, bema_alpha, step)
    return synthesize(source, sigma_rel, step)


def _check_alpha(alpha: float | None) -> None:
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"--posthoc-bema-alpha={alpha!r} is out of range; allowed values: 0 ≤ A ≤ 1 (BEMA's α)")


def write_export(
    source: str | Path, tensors: dict[str, Any], output: str | Path, merge: bool, base_model: str | None, dtype: str
) -> Path:
    """Write ``tensors`` as the run's adapter (and tokenizer) into ``output``, or merged into the base model."""
    folder = resolve_posthoc_folder(source)
    run = folder.parent if folder.name == "posthoc" else folder
    if not merge:
        if base_model is not None or dtype != "auto":
            raise ValueError("--base-model and --dtype apply only with --merge")
        write_model_files(tensors, folder, output)
        _copy_tokenizer(run, Path(output))
        return Path(output)
    if read_description(folder)["format"] != "peft":
        raise ValueError(
            f"{folder} records a full fine-tuning run: there is no adapter to merge (export without --merge)"
        )
    with tempfile.TemporaryDirectory() as work:
        adapter = Path(work) / "adapter"
        write_model_files(tensors, folder, adapter)
        _copy_tokenizer(run, Path(work))
        return merge_into_base(AveragedFolder(adapter, "posthoc", -1, True), output, base_model, dtype)


# --------------------------------------------------------------------------------- sweep
def eval_model(source: str | Path, base_model: str | None) -> tuple[Any, Any]:
    """The base model with the run's adapter (untrained values; the sweep loads each candidate) and a tokenizer."""
    from peft import PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_posthoc_folder(source)
    description = read_description(folder)
    run = folder.parent if folder.name == "posthoc" else folder
    if description["format"] == "peft":
        config = PeftConfig.from_pretrained(str(folder))
        base = base_model or config.base_model_name_or_path
        if not base:
            raise ValueError(f"{folder / ADAPTER_CONFIG} names no base model; pass --base-model")
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base), config, adapter_name=description["adapter_name"]
        )
    else:
        if not base_model:
            raise ValueError("a full fine-tuning run needs --base-model (the model it started from) for the sweep")
        base = base_model
        model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer_source = run if (run / "tokenizer_config.json").is_file() else base
    return model, AutoTokenizer.from_pretrained(str(tokenizer_source))


def run_sweep(
    source: str | Path,
    sigma_rels: list[float],
    eval_data: str | Path,
    step: int | None = None,
    bema_alpha: float | None = None,
    base_model: str | None = None,
    max_length: int = 512,
    batch_size: int = 8,
) -> SweepResult:
    """Load the model and the eval rows once, then :func:`~trl_ema_plugin.posthoc.sweep.sweep`."""
    for sigma_rel in sigma_rels:
        check_sigma_rel(sigma_rel, "--posthoc-sweep")
    _check_alpha(bema_alpha)
    for key, value in (("--max-length", max_length), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{key}={value}: allowed values: an integer ≥ 1")
    rows = read_rows(eval_data)
    model, tokenizer = eval_model(source, base_model)
    loss = TokenLoss(model, tokenizer, rows, max_length, batch_size)
    return sweep(source, sigma_rels, loss, step, bema_alpha)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``ema-export`` with post-hoc options (errors are raised for the caller to print)."""
    if args.name is not None:
        parser.error("--name selects an averager folder; the post-hoc options read RUN/posthoc/")
    if args.posthoc_sweep is not None:
        if args.posthoc_sigma_rel is not None:
            parser.error("pass either --posthoc-sigma-rel or --posthoc-sweep")
        if not args.eval_data:
            parser.error("--posthoc-sweep needs --eval-data")
        if args.output:
            check_output_folder(args.output)
        result = run_sweep(
            args.source, args.posthoc_sweep, args.eval_data, args.posthoc_step, args.posthoc_bema_alpha,
            args.base_model, args.max_length, args.batch_size,
        )  # fmt: skip
        print(result.table())
        best = result.best
        print(f"ema-export: best sigma_rel {best.label} (loss {best.loss:.6f})")
        if args.output:
            tensors = synthesized(args.source, best.sigma_rel, result.step, args.posthoc_bema_alpha)
            base = args.base_model if args.merge else None  # without --merge it only chose the eval model
            written = write_export(args.source, tensors, args.output, args.merge, base, args.dtype)
            print(f"ema-export: wrote sigma_rel {best.label} to {written}")
        return 0
    if args.eval_data is not None:
        parser.error("--eval-data applies only with --posthoc-sweep")
    if args.posthoc_sigma_rel is None:
        parser.error("--posthoc-step and --posthoc-bema-alpha need --posthoc-sigma-rel (or --posthoc-sweep)")
    if not args.output:
        parser.error("--output is required (or pass --list)")
    check_output_folder(args.output)
    tensors = synthesized(args.source, args.posthoc_sigma_rel, args.posthoc_step, args.posthoc_bema_alpha)
    written = write_export(args.source, tensors, args.output, args.merge, args.base_model, args.dtype)
    kind = "post-hoc BEMA" if args.posthoc_bema_alpha else "post-hoc EMA"
    print(f"ema-export: wrote the {kind} of sigma_rel {args.posthoc_sigma_rel:g} to {written}")
    return 0
