"""``axolotl ema-export``: the ``ema-export`` tool as an Axolotl CLI command (entry-point group
``axolotl.cli_commands``). Imported by Axolotl only, which ships ``click``.

    axolotl ema-export config.yml                  # output_dir/averaged/ -> output_dir/ema-export/
    axolotl ema-export config.yml --merge          # merged into base_model -> output_dir/ema-merged/
    axolotl ema-export --source run/checkpoint-40 --output out/ [--name ema_999] [--merge]
    axolotl ema-export config.yml --posthoc-sigma-rel 0.07   # post-hoc EMA -> output_dir/ema-posthoc/
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from .export import DTYPES, EXPORT_ERRORS, check_output_folder, describe, list_averagers, run_export
from .posthoc import synthesized, write_export

DEFAULT_OUTPUT_DIR = "./model-out"  # Axolotl's default output_dir


@click.command("ema-export")
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="run, checkpoint-N or averaged[-<name>]/ folder (default: the config's output_dir)",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="where to write (default: output_dir/ema-export or output_dir/ema-merged)",
)
@click.option("--name", default=None, help="averager name (default: the primary averager)")
@click.option("--merge", is_flag=True, help="merge the averaged adapter into the base model")
@click.option("--base-model", default=None, help="with --merge: base model (default: the config's base_model)")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="with --merge: dtype of the base model",
)
@click.option("--list", "list_only", is_flag=True, help="list the averagers and exit")
@click.option("--posthoc-sigma-rel", type=float, default=None, help="synthesize the post-hoc EMA of this σ_rel")
@click.option(
    "--posthoc-step", type=int, default=None, help="with --posthoc-sigma-rel: the snapshot step (default: last)"
)
@click.option("--posthoc-bema-alpha", type=float, default=None, help="with --posthoc-sigma-rel: post-hoc BEMA's α")
def ema_export(
    config: Path | None,
    source: Path | None,
    output: Path | None,
    name: str | None,
    merge: bool,
    base_model: str | None,
    dtype: str,
    list_only: bool,
    posthoc_sigma_rel: float | None,
    posthoc_step: int | None,
    posthoc_bema_alpha: float | None,
) -> None:
    """Export the averaged (EMA/BEMA) adapter of a run, or merge it into the base model."""
    cfg = yaml.safe_load(config.read_text()) if config is not None else {}
    if not isinstance(cfg, dict):
        raise click.BadParameter(f"{config} is not a YAML mapping", param_hint="CONFIG")
    output_dir = Path(cfg.get("output_dir") or DEFAULT_OUTPUT_DIR)
    if source is None:
        if config is None:
            raise click.UsageError("pass an Axolotl CONFIG or --source")
        source = output_dir
    try:
        if list_only:
            click.echo(describe(list_averagers(source)) or f"{source}: no averaged weights")
            return
        posthoc = posthoc_sigma_rel is not None
        if not posthoc and (posthoc_step is not None or posthoc_bema_alpha is not None):
            raise click.UsageError("--posthoc-step and --posthoc-bema-alpha need --posthoc-sigma-rel")
        if output is None:
            if config is None:
                raise click.UsageError("--output is required without a CONFIG")
            output = output_dir / ("ema-merged" if merge else "ema-posthoc" if posthoc else "ema-export")
        if merge and base_model is None:
            base_model = cfg.get("base_model")
        if posthoc:
            check_output_folder(output)
            tensors = synthesized(source, posthoc_sigma_rel, posthoc_step, posthoc_bema_alpha)
            written = write_export(source, tensors, output, merge, base_model if merge else None, dtype)
        else:
            written = run_export(source, output, name=name, merge=merge, base_model=base_model, dtype=dtype)
    except EXPORT_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"ema-export: wrote {'merged model' if merge else 'averaged weights'} to {written}")
