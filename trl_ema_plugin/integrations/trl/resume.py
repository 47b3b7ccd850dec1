"""Find the checkpoint a run resumes from, as a callback can see it, and which one to resume from instead."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ...persistence import StateFileError, holds_state, read_metadata
from ...scratch import older_checkpoints

#: the file transformers writes last into a checkpoint (``transformers.trainer.TRAINER_STATE_NAME``)
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_folder(args: Any, global_step: int) -> str:
    """``output_dir/checkpoint-<global_step>``, where the trainer writes the checkpoint of that step."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


def resolve_resume_path(requested: str | bool | None, args: Any) -> str | None:
    """``resume_from_checkpoint`` as the trainer reads it: True means the last one in ``output_dir``."""
    if requested is None or requested is False:
        return None
    if requested is True:
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ValueError(f"resume_from_checkpoint=True but {args.output_dir} holds no checkpoint")
        return last
    return str(requested)


def find_resume_checkpoint(explicit: str | bool | None, args: Any, global_step: int) -> str | None:
    """The checkpoint folder the trainer resumed from, or None for a fresh run.

    A run that starts at step 0 did not resume (the trainer restores ``global_step`` before
    ``on_train_begin``; it ignores ``TrainingArguments.resume_from_checkpoint``). ``explicit`` is the
    argument of ``trainer.train`` when :func:`attach` recorded it. Without it,
    ``args.resume_from_checkpoint`` (set by scripts that pass it on, such as Axolotl's) or
    ``output_dir/checkpoint-<global_step>`` is used.
    """
    if global_step == 0:
        return None
    path = resolve_resume_path(explicit, args)
    if path is None:
        path = resolve_resume_path(getattr(args, "resume_from_checkpoint", None), args)
    if path is None:
        path = checkpoint_folder(args, global_step)
        if not os.path.isdir(path):
            raise ValueError(
                f"the trainer resumed at step {global_step}, but {path} does not exist; a checkpoint outside "
                "output_dir reaches the averaging callback only through trl_ema_plugin.attach(trainer)"
            )
    return path


# ------------------------------------------------------------------------ which checkpoint instead
def newest_checkpoint_with(checkpoint: str | os.PathLike[str], folder: str) -> Path | None:
    """The newest ``checkpoint-M`` beside ``checkpoint`` (M below its N) whose ``folder`` holds a state that
    verifies, or None."""
    return next((c for c in older_checkpoints(checkpoint) if holds_state(c, folder)), None)


def resume_advice(checkpoint: str | os.PathLike[str], folder: str, missing: bool = False) -> str:
    """What to do when ``checkpoint/folder`` is damaged (or ``missing``): the checkpoint to resume from instead,
    or how to start that state afresh."""
    checkpoint = Path(checkpoint)
    older = newest_checkpoint_with(checkpoint, folder)
    here = "" if missing else f"{checkpoint / folder} and "
    if older is None:
        return f"Resume from another checkpoint, or delete {checkpoint / folder} to start it afresh from the weights of {checkpoint.name}"
    holders = [c.name for c in older_checkpoints(checkpoint) if (c / folder).is_dir()]
    return (
        f"Resume from {older} instead (trainer.train(resume_from_checkpoint={str(older)!r})), whose {folder}/ "
        f"verifies; or, to start it afresh from the weights of {checkpoint.name}, delete (or move away) "
        f"{here}{folder}/ in {', '.join(holders)}"
    )


def trainer_state_problem(checkpoint: Path) -> str | None:
    """What is wrong with the trainer's ``trainer_state.json`` in ``checkpoint`` (missing, or cut short), or None."""
    path = checkpoint / TRAINER_STATE_NAME
    if not path.is_file():
        return f"it has no {TRAINER_STATE_NAME}"
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {TRAINER_STATE_NAME} is not valid JSON (cut short?)"
    return None


def check_resume_checkpoint(requested: str | bool | None, args: Any, folders: list[str]) -> None:
    """Before the trainer loads the checkpoint ``trainer.train(resume_from_checkpoint=requested)`` names (seen only
    through :func:`trl_ema_plugin.attach`): refuse one the trainer did not finish writing, a temporary folder
    of an earlier version inside it (transformers would load it as an adapter), and a damaged ``folder`` of
    ours; each error names the checkpoint to resume from instead."""
    try:
        path = resolve_resume_path(requested, args)
    except ValueError:
        return  # no checkpoint at all: the trainer says so itself
    if path is None or not os.path.isdir(path):
        return
    checkpoint = Path(path)
    problem = trainer_state_problem(checkpoint)
    if problem is not None:
        complete = [c for c in older_checkpoints(checkpoint) if trainer_state_problem(c) is None]
        instead = (
            f"resume from {complete[0]} (trainer.train(resume_from_checkpoint={str(complete[0])!r})), the newest "
            "complete one, or delete"
            if complete
            else "delete"
        )
        raise ValueError(
            f"{checkpoint} is incomplete: {problem} (the run stopped while the trainer was saving it); "
            f"{instead} {checkpoint}"
        )
    for folder in folders:
        leftovers = sorted(p.name for p in checkpoint.glob(f".{folder}.*-*"))
        if leftovers:
            raise ValueError(
                f"{checkpoint} holds {', '.join(leftovers)}, temporary folders a stopped save of an earlier "
                "trl_ema_plugin left there (transformers would load them as adapters): delete them, then resume"
            )
        if (checkpoint / folder).is_dir():
            try:
                read_metadata(checkpoint / folder, warn_unverified=False)
            except StateFileError as exc:
                raise StateFileError(f"{exc}. {resume_advice(checkpoint, folder)}") from exc
