"""On-disk format of averaged weights, written atomically.

An averager's folder (``averaged/`` for the primary, ``averaged-<name>/`` for the others)
holds, in checkpoints and at the end of training:

* ``adapter_model.safetensors`` + ``adapter_config.json``: the averaged PEFT adapter,
  loadable with ``PeftModel.from_pretrained`` (full fine-tuning: ``model.safetensors`` +
  ``config.json``, loadable with ``from_pretrained``);
* ``averager_state.safetensors``: the full fp32 buffers, keyed ``"<buffer>/<parameter name>"``
  (e.g. ``"ema/base_model.model.layer.lora_A.default.weight"``);
* ``averager_state.json``: ``format_version``, ``global_step``, the averager ``spec``, its
  ``counters`` (``num_updates``, ``started_at``, ``last_update_step``) and the tracked
  ``parameters`` with their shapes.

A folder is written under a temporary name and renamed into place, so a crash mid-save
leaves either the previous folder or none, never a half-written state that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT_VERSION = 1
STATE_TENSORS = "averager_state.safetensors"
STATE_JSON = "averager_state.json"
PRIMARY_FOLDER = "averaged"


def averager_folder(name: str, primary: bool) -> str:
    """``averaged`` for the primary averager, ``averaged-<name>`` for the others."""
    return PRIMARY_FOLDER if primary else f"{PRIMARY_FOLDER}-{name}"


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``final`` by rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_state(folder: Path, tensors: dict[str, Tensor], metadata: dict[str, Any], global_step: int) -> None:
    save_file(tensors, str(folder / STATE_TENSORS))
    payload = {"format_version": FORMAT_VERSION, "global_step": global_step, **metadata}
    (folder / STATE_JSON).write_text(json.dumps(payload, indent=2, sort_keys=True))


def write_state_folder(
    final: str | os.PathLike[str],
    tensors: dict[str, Tensor],
    metadata: dict[str, Any],
    global_step: int,
    add_files: Callable[[Path], None] | None = None,
) -> None:
    """Write the folder ``final`` atomically: ``add_files(folder)`` (e.g. the averaged adapter), then the state."""
    with atomic_directory(final) as folder:
        if add_files is not None:
            add_files(folder)
        write_state(folder, tensors, metadata, global_step)


def read_state(
    folder: str | os.PathLike[str], global_step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata saved by :func:`write_state`; ``global_step``: the step the trainer resumed at,
    which must be the step the state was saved at."""
    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"no averager state in {folder} (expected {STATE_JSON} and {STATE_TENSORS})")
    metadata = json.loads(json_path.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has format_version={metadata.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    if global_step is not None and metadata.get("global_step") != global_step:
        raise ValueError(
            f"{json_path} was saved at step {metadata.get('global_step')}, but the trainer resumed at step "
            f"{global_step}: the averager state belongs to another checkpoint (check resume_from_checkpoint)"
        )
    return load_file(str(tensor_path)), metadata
