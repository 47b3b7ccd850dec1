"""Where a run's folders are written before they are complete: ``<output_dir>/.trl_ema_plugin/``.

Nothing half-written ever sits inside a ``checkpoint-N`` folder (transformers loads every sub-folder that
holds an ``adapter_model.safetensors`` as an adapter on resume), nor under a folder's final name:

* :func:`atomic_directory`: a folder is written under ``.trl_ema_plugin/tmp-<name>-<id>`` and renamed into
  place, so a crash leaves the previous folder or none;
* :func:`staged_folder`: ``.trl_ema_plugin/staged/checkpoint-N/``, the callbacks' state for a checkpoint,
  written before the trainer writes ``checkpoint-N`` and renamed into it once it exists;
* :func:`remove_stale_scratch`: the next save removes what a stopped one left.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

SCRATCH_FOLDER = ".trl_ema_plugin"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def scratch_folder(final: str | os.PathLike[str]) -> Path:
    """Where the temporary folders for ``final`` live: ``<output_dir>/.trl_ema_plugin``.

    For ``<output_dir>/checkpoint-N/averaged`` and ``<output_dir>/averaged`` alike; never inside a
    checkpoint folder. For a folder inside a scratch folder (a staged state), that scratch folder.
    """
    final = Path(final)
    for parent in final.parents:
        if parent.name == SCRATCH_FOLDER:
            return parent
    parent = final.parent
    if checkpoint_step(parent) is not None:
        parent = parent.parent
    return parent / SCRATCH_FOLDER


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; best effort where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(source: Path, final: Path) -> None:
    """Rename the complete folder ``source`` to ``final``; a folder already there is moved aside, then removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = scratch_folder(final) / f"old-{final.name}-{uuid.uuid4().hex[:8]}"
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, old)
    os.replace(source, final)
    fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder (in :func:`scratch_folder`); on success it replaces ``final``."""
    final = Path(final)
    scratch = scratch_folder(final)
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for item in tmp.iterdir():
            fsync(item)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def copy_folder(source: Path, final: Path) -> None:
    """Copy the files of ``source`` into ``final``, atomically."""
    with atomic_directory(final) as folder:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, folder / item.name)


def staged_folder(output_dir: str | os.PathLike[str], global_step: int) -> Path:
    """Where the callbacks stage their state for ``checkpoint-<global_step>`` before the trainer writes it."""
    return Path(output_dir) / SCRATCH_FOLDER / "staged" / f"checkpoint-{global_step}"


def staged_copy(checkpoint: str | os.PathLike[str], folder: str) -> Path | None:
    """The staged copy of ``checkpoint/folder`` (it may not exist); None when ``checkpoint`` is no ``checkpoint-N``."""
    checkpoint = Path(checkpoint)
    step = checkpoint_step(checkpoint)
    return None if step is None else staged_folder(checkpoint.parent, step) / folder


def remove_stale_scratch(output_dir: str | os.PathLike[str], keep_step: int | None, folders: list[str]) -> None:
    """Remove what stopped saves left: temporary folders, states staged for another step than ``keep_step``,
    and the temporary folders earlier versions wrote inside checkpoints (``checkpoint-N/.<folder>.tmp-*``).
    Call on the writing process only, when none of its writes is under way."""
    output_dir = Path(output_dir)
    scratch = output_dir / SCRATCH_FOLDER
    if scratch.is_dir():
        for item in scratch.iterdir():
            if item.name.startswith(("tmp-", "old-")):
                shutil.rmtree(item, ignore_errors=True)
        staged = scratch / "staged"
        if staged.is_dir():
            for item in staged.iterdir():
                if checkpoint_step(item) != keep_step:
                    shutil.rmtree(item, ignore_errors=True)
            _remove_if_empty(staged)
        _remove_if_empty(scratch)
    if output_dir.is_dir():
        for checkpoint in output_dir.iterdir():
            if checkpoint_step(checkpoint) is not None and checkpoint.is_dir():
                for folder in folders:
                    for item in checkpoint.glob(f".{folder}.*-*"):
                        shutil.rmtree(item, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):
        folder.rmdir()


def older_checkpoints(checkpoint: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-M`` folders beside ``checkpoint`` with M below its N, newest first."""
    checkpoint = Path(checkpoint)
    step = checkpoint_step(checkpoint)
    if step is None or not checkpoint.parent.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in checkpoint.parent.iterdir() if p.is_dir()]
    return [p for s, p in sorted((x for x in found if x[0] is not None and x[0] < step), reverse=True)]
