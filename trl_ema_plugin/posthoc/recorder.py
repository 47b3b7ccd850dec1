"""The post-hoc EMA recorder, without a trainer: power-function EMAs of the tracked weights, θ_0 and snapshots.

A :class:`PostHocRecorder` keeps one :class:`~trl_ema_plugin.shadow.AveragedWeights` (method ``power_ema``) per
σ_rel of its :class:`~trl_ema_plugin.config.posthoc.PostHocEMAConfig`, on a layout (one process, or this rank's
part under ZeRO/FSDP2). Drive it with :meth:`~PostHocRecorder.begin` at the first step of a run (fresh or resumed),
:meth:`~PostHocRecorder.step` after every optimizer step and :meth:`~PostHocRecorder.finish` at the last one:

* at ``update_after`` the EMAs start, and θ_0 is written (``keep_weights``);
* at every t > τ with (t − ``update_after``) % ``every`` == 0, and at the last step, a snapshot is written: every
  EMA and θ_t, gathered once (collective) and written by the ``writer`` (global rank 0).

The EMAs share one :class:`~trl_ema_plugin.shadow.runner.UpdateRunner` (θ_t is read once per step for all of
them, inline, on a side CUDA stream or in the offload worker); a snapshot or a checkpoint waits for the update.
The TRL callback calls these at ``on_train_begin`` / ``on_step_end`` / ``on_train_end``; :func:`replay` calls them
with a recorded trajectory θ_0..θ_T, so both write the same files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import AveragerSpec
from ..config.posthoc import PostHocEMAConfig
from ..shadow import AveragedWeights, LocalLayout, ShadowLayout
from ..shadow.runner import UpdateRunner, build_runner
from ..shadow.store import step_together
from .snapshots import THETA0_FILE, is_snapshot_file, profile_name, read_snapshot, write_snapshot, write_theta0

ABANDONED_PREFIX = "abandoned-"


def power_spec(sigma_rel: float, config: PostHocEMAConfig) -> AveragerSpec:
    """The ``power_ema`` averager of one recorded σ_rel, with the recorder's cadence."""
    return AveragerSpec(
        method="power_ema",
        name=profile_name(sigma_rel),
        sigma_rel=sigma_rel,
        update_every=config.update_every,
        update_after=config.update_after,
    )


class PostHocRecorder:
    """Power-function EMAs of the weights a layout points at, written as snapshots into ``folder``."""

    def __init__(
        self,
        config: PostHocEMAConfig,
        layout: ShadowLayout,
        folder: str | os.PathLike[str],
        every: int,
        device: torch.device | str | None = None,
        runner: UpdateRunner | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every!r}: snapshots need an interval ≥ 1 optimizer step")
        self.config = config
        self.layout = layout
        self.folder = Path(folder)
        self.every = every
        shadow_device = torch.device(device) if device is not None else layout.device
        #: where the EMAs update (default inline); shared, so that θ_t is read once per step for all of them
        self.runner = runner if runner is not None else build_runner("inline", layout, shadow_device)
        self.weights = {
            s: AveragedWeights(power_spec(s, config), layout, shadow_device, runner=self.runner)
            for s in config.sigma_rels
        }
        self.last_snapshot: int | None = None  # the step of the last snapshot written (or of the restored state)
        self._started_at: int | None = None  # as submitted: the start itself may still run on the runner

    @property
    def started_at(self) -> int | None:
        """The step τ at which the EMAs started (None before)."""
        return self._started_at

    @property
    def profile_time(self) -> int:
        """t of the EMAs' profiles: steps from τ to their last update (waits for the update in flight)."""
        self.runner.wait()
        averager = next(iter(self.weights.values())).averager
        assert averager.started_at is not None and averager.last_update_step is not None
        return averager.last_update_step - averager.started_at

    # ----------------------------------------------------------------- cadence
    def begin(self, t: int, writer: bool) -> list[Path]:
        """The first step of a run (fresh, or resumed with :meth:`load_state` done): move aside what does not belong
        to this run (see :meth:`tidy`), then take step ``t``. Returns the moved files."""
        moved = self.tidy(t) if writer else []
        self.step(t, writer)
        return moved

    def step(self, t: int, writer: bool) -> None:
        """Fold θ_t into the EMAs where ``t`` is a start or update step; write θ_0 or a snapshot where due."""
        starts = next(iter(self.weights.values())).due(t) == "start"
        step_together(list(self.weights.values()), t)
        if starts:
            self._started_at = t
            if self.config.keep_weights:
                theta = self.live_weights()
                if writer:
                    write_theta0(self.folder, t, theta, self.config.dtype)
        elif self.is_snapshot_step(t):
            self.snapshot(t, writer)

    def is_snapshot_step(self, t: int) -> bool:
        started = self.started_at
        return started is not None and t > started and (t - self.config.update_after) % self.every == 0

    def finish(self, t: int, writer: bool, with_weights: bool = True) -> None:
        """The last step: a snapshot at ``t`` unless one was written there (``with_weights=False``: without θ,
        e.g. when the trainer has loaded another checkpoint's weights)."""
        started = self.started_at
        if started is not None and t > started and self.last_snapshot != t:
            self.snapshot(t, writer, with_weights=with_weights)

    def snapshot(self, t: int, writer: bool, with_weights: bool = True) -> None:
        """Gather every EMA (and θ_t) once, collectively; the ``writer`` writes ``snapshot-<t>.safetensors``."""
        assert self.started_at is not None
        emas = {s: weights.averaged_tensors(t) for s, weights in self.weights.items()}
        theta = self.live_weights() if with_weights and self.config.keep_weights else None
        if writer:
            write_snapshot(self.folder, t, self.started_at, self.profile_time, emas, theta, self.config.dtype)
        self.last_snapshot = t

    @torch.no_grad()
    def live_weights(self) -> dict[str, Tensor]:
        """θ_t, full tensors by name (collective under multi-process layouts)."""
        local = [x.to(torch.float32) for x in self.layout.local_tensors()]
        return dict(zip(self.layout.names, self.layout.gather(local), strict=True))

    # ------------------------------------------------------------------- files
    def tidy(self, t: int) -> list[Path]:
        """Delete temporary files of an interrupted write; move aside, into ``abandoned-step<t>-<time>/``, every
        snapshot after step ``t`` (an abandoned trajectory: the run resumed from an earlier checkpoint) and every
        file of another start of averaging (an earlier run in the same ``output_dir``), unreadable ones too."""
        if not self.folder.is_dir():
            return []
        for path in self.folder.iterdir():
            if path.is_file() and path.name.startswith(".") and ".tmp" in path.name:  # ours, or safetensors' own
                path.unlink(missing_ok=True)
        stale = [p for p in sorted(self.folder.iterdir()) if self._is_stale(p, t)]
        if not stale:
            return []
        aside = self.folder / f"{ABANDONED_PREFIX}step{t}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in stale:
            os.replace(path, aside / path.name)
        return [aside / p.name for p in stale]

    def _is_stale(self, path: Path, t: int) -> bool:
        kind = "snapshot" if is_snapshot_file(path) else "theta0" if path.name == THETA0_FILE else None
        if kind is None:
            return False
        try:
            header = read_snapshot(path, kind=kind)
        except ValueError:
            return True
        return header.started_at != self.started_at or header.global_step > t

    # ------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        """Every EMA's full buffers, keyed ``"<profile>/<buffer>/<parameter name>"`` (collective)."""
        tensors = {}
        for sigma_rel, weights in self.weights.items():
            for key, tensor in weights.state_tensors().items():
                tensors[f"{profile_name(sigma_rel)}/{key}"] = tensor
        return tensors

    def state_metadata(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.config.sigma_rels),
            "every": self.every,
            "last_snapshot": self.last_snapshot,
            "averagers": {profile_name(s): w.state_metadata() for s, w in self.weights.items()},
        }

    def load_state(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any], where: str) -> None:
        """Restore the EMAs saved by :meth:`state_tensors` / :meth:`state_metadata` (any world size)."""
        saved = [float(s) for s in metadata["sigma_rels"]]
        if sorted(saved) != sorted(self.config.sigma_rels):
            raise ValueError(
                f"{where} holds the post-hoc EMAs of sigma_rels={saved}, but this run asks for "
                f"sigma_rels={list(self.config.sigma_rels)}: resume with the saved sigma_rels (the snapshots of one "
                "run share them), or record another run into a new output_dir"
            )
        for sigma_rel, weights in self.weights.items():
            prefix = f"{profile_name(sigma_rel)}/"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            weights.load_state(own, metadata["averagers"][profile_name(sigma_rel)])
        self._started_at = next(iter(self.weights.values())).averager.started_at
        self.last_snapshot = metadata.get("last_snapshot")


@torch.no_grad()
def replay(
    trajectory: Iterable[tuple[int, Mapping[str, Tensor]]],
    config: PostHocEMAConfig,
    folder: str | os.PathLike[str],
    every: int,
) -> PostHocRecorder:
    """Record a trajectory after the fact: ``(t, θ_t)`` pairs in step order, every optimizer step from the first
    (the run's ``global_step`` at train begin) to the last. Calls the recorder exactly as the TRL callback does,
    so the files in ``folder`` are those an online run with ``config`` would have written."""
    recorder: PostHocRecorder | None = None
    carrier: list[nn.Parameter] = []
    t = -1
    for t, theta in trajectory:
        if recorder is None:
            named = [(n, nn.Parameter(v.detach().clone(), requires_grad=False)) for n, v in theta.items()]
            carrier = [p for _, p in named]
            recorder = PostHocRecorder(config, LocalLayout(named), folder, every, "cpu")
            recorder.begin(t, writer=True)
            continue
        torch._foreach_copy_(carrier, [theta[n] for n in recorder.layout.names])
        recorder.step(t, writer=True)
    if recorder is None:
        raise ValueError("replay got an empty trajectory")
    recorder.finish(t, writer=True)
    return recorder
