"""On-disk format of post-hoc EMA snapshots: one safetensors file per snapshot, written atomically.

``output_dir/posthoc/`` holds

* ``snapshot-<global_step:08d>.safetensors``: every tracked power-function EMA at that step, keyed
  ``"<profile>/<parameter name>"`` (profile ``sigma_rel_<σ_rel>``, e.g. ``"sigma_rel_0.05/base_model.model.
  model.layers.0.self_attn.q_proj.lora_A.default.weight"``), and, when written with ``theta``, the live
  weights θ_T keyed ``"theta/<parameter name>"`` (post-hoc BEMA needs them, and they are the raw baseline);
* ``theta0.safetensors``: θ_0, the weights when averaging started (``"theta/<parameter name>"``), once.

Each file's safetensors header carries one JSON string under ``"trl_ema_plugin.posthoc"``: ``format_version``
(1), ``kind`` (``snapshot`` | ``theta0``), ``global_step``, ``started_at`` (the step τ at which averaging
started), ``t`` (steps from τ to the EMAs' last update: the time of their profiles), ``profiles`` (``name``,
``sigma_rel``, ``gamma``), ``dtype`` (float32 | bfloat16 | float16), ``theta`` (whether θ is included) and
``parameters`` (name → shape). The file is self-describing; there is no side file to go out of step with it.

A file is written under a temporary name (``.<name>.tmp-<hex>``), flushed to disk and renamed into place, so
a crash mid-write leaves no file, never a partial one, under the final name; the listing ignores temporary
names. The reader checks each file (complete, the expected tensors, shapes and dtype) and names the file in
every error.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..averagers.power import check_sigma_rel, sigma_rel_to_gamma

FORMAT_VERSION = 1
POSTHOC_FOLDER = "posthoc"
METADATA_KEY = "trl_ema_plugin.posthoc"
THETA = "theta"
THETA0_FILE = "theta0.safetensors"
SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_SNAPSHOT_FILE = re.compile(r"snapshot-(\d+)\.safetensors")


def profile_name(sigma_rel: float) -> str:
    """``sigma_rel_<σ_rel>``, the shortest repr that reads back as the same float."""
    return f"sigma_rel_{float(sigma_rel)!r}"


def snapshot_path(folder: str | os.PathLike[str], global_step: int) -> Path:
    return Path(folder) / f"snapshot-{global_step:08d}.safetensors"


@dataclass(frozen=True)
class Profile:
    """One tracked power-function EMA."""

    name: str
    sigma_rel: float
    gamma: float


@dataclass(frozen=True)
class Snapshot:
    """A checked snapshot (or θ_0) file: its header, no tensor data."""

    path: Path
    kind: str
    global_step: int
    started_at: int
    t: int
    profiles: tuple[Profile, ...]
    dtype: str
    has_theta: bool
    parameters: dict[str, tuple[int, ...]]

    def key(self, buffer: str, parameter: str) -> str:
        """``"<profile or theta>/<parameter name>"``."""
        return f"{buffer}/{parameter}"


# ------------------------------------------------------------------ writing
def check_dtype(dtype: str, key: str = "dtype") -> torch.dtype:
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"{key}={dtype!r} is not a snapshot dtype; allowed values: {', '.join(SNAPSHOT_DTYPES)}")
    return SNAPSHOT_DTYPES[dtype]


def write_snapshot(
    folder: str | os.PathLike[str],
    global_step: int,
    started_at: int,
    t: int,
    emas: Mapping[float, Mapping[str, Tensor]],
    theta: Mapping[str, Tensor] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write ``snapshot-<global_step>.safetensors``: each EMA (σ_rel → full tensors by parameter name, all
    with the same names and shapes) and optionally the live weights θ, in ``dtype``. Returns the path."""
    if not emas:
        raise ValueError("a snapshot needs at least one EMA (σ_rel → tensors)")
    if not 0 <= t <= global_step - started_at:
        raise ValueError(
            f"t={t} must lie in [0, global_step − started_at] = [0, {global_step - started_at}] "
            f"(steps from the start of averaging to the EMAs' last update)"
        )
    buffers: dict[str, Mapping[str, Tensor]] = {}
    profiles = []
    for sigma_rel, tensors in emas.items():
        sigma_rel = check_sigma_rel(sigma_rel)
        name = profile_name(sigma_rel)
        if name in buffers:
            raise ValueError(f"σ_rel={sigma_rel!r} is given twice")
        buffers[name] = tensors
        profiles.append({"name": name, "sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel)})
    if theta is not None:
        buffers[THETA] = theta
    metadata = {"kind": "snapshot", "global_step": global_step, "started_at": started_at, "t": t, "profiles": profiles}
    return _write(snapshot_path(folder, global_step), buffers, metadata, dtype)


def write_theta0(
    folder: str | os.PathLike[str], started_at: int, theta: Mapping[str, Tensor], dtype: str = "float32"
) -> Path:
    """Write ``theta0.safetensors``: θ_0, the weights at the step averaging started."""
    metadata = {"kind": "theta0", "global_step": started_at, "started_at": started_at, "t": 0, "profiles": []}
    return _write(Path(folder) / THETA0_FILE, {THETA: theta}, metadata, dtype)


def _write(path: Path, buffers: dict[str, Mapping[str, Tensor]], metadata: dict[str, Any], dtype: str) -> Path:
    torch_dtype = check_dtype(dtype)
    first_name, first = next(iter(buffers.items()))
    parameters = {name: list(tensor.shape) for name, tensor in first.items()}
    tensors: dict[str, Tensor] = {}
    for buffer, by_name in buffers.items():
        shapes = {name: list(tensor.shape) for name, tensor in by_name.items()}
        if shapes != parameters:
            differ = _first_differences(shapes, parameters)
            raise ValueError(f"{buffer!r} holds other tensors than {first_name!r} (first differences: {differ})")
        for name, tensor in by_name.items():
            tensors[f"{buffer}/{name}"] = tensor.detach().to(device="cpu", dtype=torch_dtype, copy=True).contiguous()
    header = {
        "format_version": FORMAT_VERSION,
        **metadata,
        "dtype": dtype,
        "theta": THETA in buffers,
        "parameters": parameters,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(tensors, path, {METADATA_KEY: json.dumps(header, sort_keys=True)})
    return path


def atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` to a temporary name beside ``path``, fsync, then ``os.replace`` into place."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ------------------------------------------------------------------ reading
def resolve_posthoc_folder(path: str | os.PathLike[str]) -> Path:
    """``path/posthoc`` for a run's ``output_dir``, else ``path`` itself (a ``posthoc/`` folder)."""
    path = Path(path)
    if (path / POSTHOC_FOLDER).is_dir():
        return path / POSTHOC_FOLDER
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{path} is not a folder (expected a run's output_dir or its {POSTHOC_FOLDER}/ folder)")


def read_snapshot(path: str | os.PathLike[str], kind: str = "snapshot") -> Snapshot:
    """The checked header of a snapshot (or, ``kind="theta0"``, θ_0) file; a ``ValueError`` names the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            names = handle.keys()
            stored = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in names}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a complete safetensors file (truncated or corrupt: {exc})") from None
    if METADATA_KEY not in raw:
        raise ValueError(f"{path} is not a post-hoc EMA file: its header has no {METADATA_KEY!r} metadata")
    try:
        header = json.loads(raw[METADATA_KEY])
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version={header.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        if header["kind"] != kind:
            raise ValueError(f"kind={header['kind']!r}, expected {kind!r}")
        snapshot = Snapshot(
            path=path,
            kind=kind,
            global_step=int(header["global_step"]),
            started_at=int(header["started_at"]),
            t=int(header["t"]),
            profiles=tuple(Profile(p["name"], float(p["sigma_rel"]), float(p["gamma"])) for p in header["profiles"]),
            dtype=str(header["dtype"]),
            has_theta=bool(header["theta"]),
            parameters={name: tuple(shape) for name, shape in header["parameters"].items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: bad post-hoc EMA metadata ({detail})") from None
    _check_tensors(snapshot, stored)
    match = _SNAPSHOT_FILE.fullmatch(path.name)
    if kind == "snapshot" and (match is None or int(match.group(1)) != snapshot.global_step):
        raise ValueError(
            f"{path} holds step {snapshot.global_step}; its name must be {snapshot_path('', snapshot.global_step)}"
        )
    return snapshot


def _check_tensors(snapshot: Snapshot, stored: dict[str, tuple[tuple[int, ...], str]]) -> None:
    buffers = [p.name for p in snapshot.profiles] + ([THETA] if snapshot.has_theta else [])
    expected = {snapshot.key(b, n): shape for b in buffers for n, shape in snapshot.parameters.items()}
    differ = _first_differences(expected, {key: shape for key, (shape, _) in stored.items()})
    if differ:
        raise ValueError(f"{snapshot.path} holds other tensors than its metadata lists (first differences: {differ})")
    for key, (_, dtype) in stored.items():
        if _SAFETENSORS_DTYPES.get(dtype) != snapshot.dtype:
            raise ValueError(f"{snapshot.path}: tensor {key!r} is {dtype}, the metadata says {snapshot.dtype}")


def list_snapshots(folder: str | os.PathLike[str]) -> list[Snapshot]:
    """Every snapshot of a run (``output_dir`` or its ``posthoc/``), checked, by step. Snapshots of one run
    share the start of averaging and the tracked parameters; anything else is an error naming both files."""
    folder = resolve_posthoc_folder(folder)
    paths = [p for p in folder.iterdir() if _SNAPSHOT_FILE.fullmatch(p.name)]
    snapshots = sorted((read_snapshot(p) for p in paths), key=lambda s: s.global_step)
    for snapshot in snapshots[1:]:
        _check_same_run(snapshots[0], snapshot)
    return snapshots


def read_theta0(folder: str | os.PathLike[str]) -> Snapshot:
    """The checked header of ``theta0.safetensors``."""
    path = resolve_posthoc_folder(folder) / THETA0_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run kept no θ_0 (post-hoc BEMA needs it)")
    return read_snapshot(path, kind="theta0")


def _check_same_run(first: Snapshot, other: Snapshot) -> None:
    if other.started_at != first.started_at:
        raise ValueError(
            f"{other.path} started averaging at step {other.started_at}, {first.path} at step {first.started_at}: "
            "the folder mixes runs"
        )
    if other.parameters != first.parameters:
        differ = _first_differences(other.parameters, first.parameters)
        raise ValueError(f"{other.path} tracks other parameters than {first.path} (first differences: {differ})")


def _first_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The first three keys (sorted) whose values differ or that only one mapping has."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[:3]
