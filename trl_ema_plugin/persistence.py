"""On-disk format of averaged weights: written atomically, verified on reading.

An averager's folder (``averaged/`` for the primary, ``averaged-<name>/`` for the others)
holds, in checkpoints and at the end of training:

* ``adapter_model.safetensors`` + ``adapter_config.json``: the averaged PEFT adapter,
  loadable with ``PeftModel.from_pretrained`` (full fine-tuning: ``model.safetensors`` +
  ``config.json``, loadable with ``from_pretrained``);
* ``averager_state.safetensors``: the full fp32 buffers, keyed ``"<buffer>/<parameter name>"``
  (e.g. ``"ema/base_model.model.layer.lora_A.default.weight"``);
* ``averager_state.json``: ``format_version``, ``global_step``, the averager ``spec``, its
  ``counters`` (``num_updates``, ``started_at``, ``last_update_step``, ``skipped_updates``), the
  tracked ``parameters`` with their shapes, and ``files``: the size and sha256 of every other file
  in the folder (format 2; format 1 folders, written before checksums, still load, unverified).

A folder is written under a temporary name in the run's scratch folder (``<output_dir>/.trl_ema_plugin/``,
never inside a checkpoint, where transformers would load it as an adapter; :mod:`trl_ema_plugin.scratch`)
and renamed into place, so a crash mid-save leaves either the previous folder or none, never a half-written
one under the final name. Reading verifies every file against its recorded digest; each problem is a
:class:`StateFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .scratch import atomic_directory, staged_copy

FORMAT_VERSION = 2
#: format 1: no ``files`` checksums (trl_ema_plugin before crash-safe checkpoints)
READABLE_VERSIONS = (1, 2)
STATE_TENSORS = "averager_state.safetensors"
STATE_JSON = "averager_state.json"
PRIMARY_FOLDER = "averaged"
_CHUNK = 1 << 20


class StateFileError(ValueError):
    """A state folder that cannot be used as it is; the message names the file and what is wrong."""


def averager_folder(name: str, primary: bool) -> str:
    """``averaged`` for the primary averager, ``averaged-<name>`` for the others."""
    return PRIMARY_FOLDER if primary else f"{PRIMARY_FOLDER}-{name}"


# ---------------------------------------------------------------------------------- checksums
def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def folder_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Digest of every file in ``folder`` except the state JSON (which records them)."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_JSON}


def check_file(path: Path, recorded: dict[str, Any], recorded_in: Path) -> None:
    """Raise :class:`StateFileError` when ``path`` is missing, truncated, or differs from its recorded sha256."""
    if not path.is_file():
        raise StateFileError(f"{path} is missing ({recorded_in} lists it)")
    size = path.stat().st_size
    if size != recorded.get("bytes"):
        raise StateFileError(
            f"{path} is damaged: it has {size} bytes, but {recorded_in.name} recorded {recorded.get('bytes')} "
            "(truncated, or written over)"
        )
    if file_digest(path)["sha256"] != recorded.get("sha256"):
        raise StateFileError(f"{path} is damaged: its sha256 differs from the one recorded in {recorded_in.name}")


# ------------------------------------------------------------------------------- write / read
def write_state(folder: Path, tensors: dict[str, Tensor], metadata: dict[str, Any], global_step: int) -> None:
    """``averager_state.safetensors``, then ``averager_state.json`` with the digests of every file in ``folder``."""
    save_file(tensors, str(folder / STATE_TENSORS))
    payload = {"format_version": FORMAT_VERSION, "global_step": global_step, **metadata}
    payload["files"] = folder_digests(folder)
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


def read_metadata(folder: str | os.PathLike[str], warn_unverified: bool = True) -> dict[str, Any]:
    """The state JSON of ``folder``, checked: valid JSON, a known ``format_version``, every listed file intact.

    Raises ``FileNotFoundError`` when the folder holds no state, :class:`StateFileError` naming the file
    otherwise. A format 1 folder (no checksums) is read unverified, with a warning.
    """
    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"no averager state in {folder} (expected {STATE_JSON} and {STATE_TENSORS})")
    try:
        metadata = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{json_path} is damaged: not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise StateFileError(f"{json_path} is damaged: it holds a {type(metadata).__name__}, not an object")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StateFileError(
            f"{json_path} has format_version={version!r}; this version of trl_ema_plugin reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
        )
    if version == 1:
        if not warn_unverified:
            return metadata
        message = (
            f"{folder} was written before state files carried checksums (format_version 1): it is read "
            "without verification"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logging.getLogger(__name__).warning(message)
        return metadata
    files = metadata.get("files")
    if not isinstance(files, dict) or STATE_TENSORS not in files:
        raise StateFileError(f"{json_path} is damaged: it lacks the 'files' block with the checksum of {STATE_TENSORS}")
    for name, recorded in files.items():
        check_file(folder / name, recorded if isinstance(recorded, dict) else {}, json_path)
    return metadata


def read_state(
    folder: str | os.PathLike[str], global_step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata saved by :func:`write_state`, verified (:func:`read_metadata`); ``global_step``:
    the step the trainer resumed at, which must be the step the state was saved at."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if global_step is not None and metadata.get("global_step") != global_step:
        raise ValueError(
            f"{json_path} was saved at step {metadata.get('global_step')}, but the trainer resumed at step "
            f"{global_step}: the averager state belongs to another checkpoint (check resume_from_checkpoint)"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise StateFileError(f"{tensor_path} is damaged: it does not load ({exc})") from exc
    return tensors, metadata


def holds_state(checkpoint: str | os.PathLike[str], folder: str) -> bool:
    """Whether ``checkpoint/folder``, or its staged copy, holds a state that verifies."""
    for candidate in (Path(checkpoint) / folder, staged_copy(checkpoint, folder)):
        if candidate is not None and candidate.is_dir():
            try:
                read_metadata(candidate, warn_unverified=False)
                return True
            except (OSError, ValueError):
                continue
    return False
