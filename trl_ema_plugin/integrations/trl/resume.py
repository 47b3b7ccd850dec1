"""Find the checkpoint a run resumes from, as a callback can see it."""

from __future__ import annotations

import os
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint


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
