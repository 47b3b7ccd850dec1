"""``ema-export``: write the averaged adapter of a run or checkpoint, or merge it into the base model.

    ema-export RUN_OR_CHECKPOINT --output DIR [--name NAME] [--merge [--base-model PATH] [--dtype D]]
    ema-export RUN_OR_CHECKPOINT --list
    ema-export RUN --posthoc-sigma-rel S --output DIR [--posthoc-step N] [--posthoc-bema-alpha A] [--merge]
    ema-export RUN --posthoc-sweep S [S ...] --eval-data FILE [--output DIR]

``RUN_OR_CHECKPOINT`` is an ``output_dir`` (its final ``averaged/``), a ``checkpoint-N`` folder,
or an averager folder itself (``averaged/``, ``averaged-<name>/``); the folder format is in
:mod:`trl_ema_plugin.persistence`. Without ``--merge`` the PEFT adapter (``adapter_model.safetensors``
+ ``adapter_config.json``) is written to ``--output``, loadable with ``PeftModel.from_pretrained``.
With ``--merge`` the base model (``--base-model``, default: the adapter's ``base_model_name_or_path``)
is loaded, the averaged adapter applied and merged (``merge_and_unload``: W ← W + (α/r)·B·A), and the
full model saved. The tokenizer of the run, when present, is saved beside it. The ``--posthoc-*`` options
synthesize a post-hoc EMA from the run's ``posthoc/`` snapshots instead (:mod:`trl_ema_plugin.cli.posthoc`).

What it reads is checked first (the checksums recorded in ``averager_state.json``, and every weight file
loads); what it writes is read back and compared. Every error names the path and exits with code 2.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..persistence import PRIMARY_FOLDER, STATE_JSON, STATE_TENSORS, averager_folder, file_digest, read_metadata

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FULL_MODEL_MARKER = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: what an export can fail with; ``main`` prints each as one line naming the path
EXPORT_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)
#: a Hugging Face Hub model id: ``name`` or ``namespace/name``
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class AveragedFolder:
    """An averager's folder and what it holds."""

    path: Path
    name: str
    global_step: int
    is_adapter: bool

    @property
    def run_folder(self) -> Path:
        """The checkpoint or output folder that holds it (tokenizer files live there)."""
        return self.path.parent


def list_averagers(source: str | Path) -> list[AveragedFolder]:
    """Every averager folder in ``source`` (primary first), or ``source`` itself if it is one."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder")
    if (source / STATE_JSON).is_file():
        return [_describe(source)]
    folders = []
    if (source / PRIMARY_FOLDER / STATE_JSON).is_file():
        folders.append(_describe(source / PRIMARY_FOLDER))
    for path in sorted(source.glob(f"{PRIMARY_FOLDER}-*")):
        if (path / STATE_JSON).is_file():
            folders.append(_describe(path))
    return folders


def _describe(path: Path) -> AveragedFolder:
    metadata = read_metadata(path)  # checksums of every file, named on a mismatch
    is_adapter = all((path / f).is_file() for f in ADAPTER_FILES)
    if not is_adapter and not (path / FULL_MODEL_MARKER).is_file():
        raise FileNotFoundError(f"{path} holds averager state but neither {' + '.join(ADAPTER_FILES)} nor a full model")
    name = metadata.get("name") or path.name.removeprefix(f"{PRIMARY_FOLDER}-")
    return AveragedFolder(path, name, int(metadata.get("global_step", -1)), is_adapter)


def find_averaged_folder(source: str | Path, name: str | None = None) -> AveragedFolder:
    """The folder of averager ``name`` (default: the primary) in ``source``."""
    found = list_averagers(source)
    if not found:
        checkpoints = sorted(
            (
                p
                for p in Path(source).glob("checkpoint-*")
                if p.name.removeprefix("checkpoint-").isdigit() and _holds_averagers(p)
            ),
            key=lambda p: int(p.name.removeprefix("checkpoint-")),
        )
        hint = f"; its checkpoints that hold some: {', '.join(p.name for p in checkpoints)}" if checkpoints else ""
        raise FileNotFoundError(
            f"{source} holds no averaged weights: expected {PRIMARY_FOLDER}/ or {PRIMARY_FOLDER}-<name>/ "
            f"with {STATE_JSON} (a run's output_dir or one of its checkpoint-N folders){hint}"
        )
    if name is None:
        return found[0]
    for folder in found:
        if name in (folder.name, folder.path.name) or folder.path.name == averager_folder(name, primary=False):
            return folder
    raise ValueError(f"no averager named {name!r} in {source}; available: {', '.join(f.name for f in found)}")


def _holds_averagers(checkpoint: Path) -> bool:
    try:
        return bool(list_averagers(checkpoint))
    except EXPORT_ERRORS:
        return False


def check_weight_files(folder: Path) -> None:
    """Every ``*.safetensors`` weight file of ``folder`` loads, tensor by tensor (a truncated one is named)."""
    for path in sorted(folder.glob("*.safetensors")):
        if path.name == STATE_TENSORS:
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(f"{path} is damaged: it does not load ({exc})") from exc


def export_adapter(folder: AveragedFolder, output: str | Path) -> Path:
    """Copy the averaged adapter (or full model) files, and the run's tokenizer, into ``output``; each copy is
    read back and compared with its source."""
    check_weight_files(folder.path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for item in sorted(folder.path.iterdir()):
        if item.is_file() and not item.name.startswith("averager_state"):
            shutil.copy2(item, output / item.name)
            if file_digest(output / item.name) != file_digest(item):
                raise OSError(f"{output / item.name} differs from {item} after copying it (disk full or failing?)")
    _copy_tokenizer(folder.run_folder, output)
    return output


def _copy_tokenizer(source: Path, output: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
            copied.append(name)
    return copied


def merge_into_base(
    folder: AveragedFolder, output: str | Path, base_model: str | None = None, dtype: str = "auto"
) -> Path:
    """Apply the averaged adapter to the base model, merge it (``merge_and_unload``) and save the result."""
    import torch
    from peft import PeftConfig, PeftModel

    if not folder.is_adapter:
        raise ValueError(
            f"{folder.path} holds a full model, not an adapter: there is nothing to merge (export it without --merge)"
        )
    check_weight_files(folder.path)
    peft_config = PeftConfig.from_pretrained(str(folder.path))
    base = base_model or peft_config.base_model_name_or_path
    if not base:
        raise ValueError(f"{folder.path}/adapter_config.json names no base model; pass --base-model")
    check_base_model(base, "--base-model" if base_model else f"{folder.path}/adapter_config.json's base model")
    model_class = _auto_class(peft_config.task_type)
    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = model_class.from_pretrained(base, dtype=torch_dtype)
    except EXPORT_ERRORS as exc:
        raise ValueError(f"the base model {base} does not load: {exc}") from exc
    try:
        merged = PeftModel.from_pretrained(model, str(folder.path)).merge_and_unload()
    except EXPORT_ERRORS as exc:
        raise ValueError(f"the averaged adapter {folder.path} does not apply to the base model {base}: {exc}") from exc
    output = Path(output)
    merged.save_pretrained(str(output), safe_serialization=True)
    check_written_model(output, merged.state_dict())
    if not _copy_tokenizer(folder.run_folder, output):
        _save_base_tokenizer(base, output)
    return output


def check_base_model(base: str, given_as: str) -> None:
    """A base model that is neither an existing folder nor a Hub model id is an error naming it."""
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{given_as} {base} is a file; pass the folder of a model (or a Hub model id)")
        return
    if not _HUB_ID.match(base):
        raise FileNotFoundError(f"{given_as} {base}: no such folder (and not a Hugging Face Hub model id)")


def check_written_model(output: Path, state: dict[str, Any]) -> None:
    """Read every tensor written to ``output`` back and compare it with the merged model's."""
    import torch

    seen = 0
    for path in sorted(output.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    written = handle.get_tensor(key)
                    if key in state and not torch.equal(written, state[key].detach().cpu()):
                        raise OSError(f"{path}: {key} differs from the merged model after writing it")
                    seen += 1
        except (SafetensorError, RuntimeError) as exc:
            raise OSError(f"{path} does not load after writing it ({exc})") from exc
    if seen == 0:
        raise OSError(f"{output} holds no weights after writing the merged model")


def _auto_class(task_type: str | None) -> Any:
    import transformers

    names = {
        None: "AutoModelForCausalLM",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }
    return getattr(transformers, names.get(str(task_type) if task_type else None, "AutoModel"))


def _save_base_tokenizer(base: str, output: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(str(output))
    except (OSError, ValueError) as exc:
        print(f"ema-export: no tokenizer saved ({base} has none that loads: {exc})", file=sys.stderr)


def run_export(
    source: str | Path,
    output: str | Path,
    name: str | None = None,
    merge: bool = False,
    base_model: str | None = None,
    dtype: str = "auto",
) -> Path:
    """What the command does: find the averager folder, then export or merge it into a new or empty ``output``."""
    folder = find_averaged_folder(source, name)
    check_output_folder(output)
    if merge:
        return merge_into_base(folder, output, base_model=base_model, dtype=dtype)
    if base_model is not None or dtype != "auto":
        raise ValueError("--base-model and --dtype apply only with --merge")
    return export_adapter(folder, output)


def check_output_folder(output: str | Path) -> None:
    """Refuse an ``output`` that is a file or a non-empty folder (the run itself, an earlier export, ...)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; pass a new or empty folder")
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(
            f"--output {output} is not empty; pass a new or empty folder, so no file is overwritten or mixed"
        )


def describe(folders: list[AveragedFolder]) -> str:
    lines = []
    for index, folder in enumerate(folders):
        kind = "adapter" if folder.is_adapter else "full model"
        role = "primary" if index == 0 and folder.path.name == PRIMARY_FOLDER else "extra"
        lines.append(f"{folder.name}\t{role}\tstep {folder.global_step}\t{kind}\t{folder.path}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ema-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="output_dir, checkpoint-N folder, or an averaged[-<name>]/ folder")
    parser.add_argument("-o", "--output", help="folder to write the adapter (or, with --merge, the merged model) to")
    parser.add_argument("--name", help="averager name (default: the primary averager, averaged/)")
    parser.add_argument("--merge", action="store_true", help="merge the averaged adapter into the base model")
    parser.add_argument("--base-model", help="with --merge: base model path or id (default: from adapter_config.json)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="with --merge: dtype to load the base model in")
    parser.add_argument("--list", action="store_true", help="list the averagers (and post-hoc snapshots) in SOURCE")
    from . import posthoc  # it imports this module's helpers

    posthoc.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from . import posthoc

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            found = list_averagers(args.source)
            snapshots = posthoc.describe_snapshots(args.source, args.posthoc_sigma_rel, args.posthoc_step)
            print(describe(found) if found else f"{args.source}: no averaged weights")
            if snapshots is not None:
                print(snapshots)
            return 0 if found or snapshots is not None else 1
        if posthoc.requested(args):
            return posthoc.main(args, parser)
        if not args.output:
            parser.error("--output is required (or pass --list)")
        written = run_export(args.source, args.output, args.name, args.merge, args.base_model, args.dtype)
    except EXPORT_ERRORS as exc:
        print(f"ema-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"ema-export: wrote {'merged model' if args.merge else 'averaged weights'} to {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
