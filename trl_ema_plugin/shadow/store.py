"""The shadow store: one averager's fp32 state for the tracked weights, on device or offloaded.

An update costs per byte: θ_t reaches the averager's math in place (fp32 live weights on the shadow
device) or through one conversion into a persistent flat fp32 staging buffer
(:class:`~trl_ema_plugin.shadow.live.LiveWeights`), read once per step for every averager that is due
(:func:`step_together`), and each op of the formula is one kernel over the flat buffers. The update runs
inline, on a side CUDA stream or in a background worker (:mod:`~trl_ema_plugin.shadow.runner`); every
method that reads the averages waits for it first.

The store also guards the state: an update whose θ_t holds NaN or inf is skipped, counted and described
(:attr:`AveragedWeights.skip_warning`), or raises :class:`NonFiniteWeightsError`, by ``on_nonfinite``. The
check is one reduction over θ_t inside the update job (:func:`_check_theta`,
:class:`~trl_ema_plugin.shadow.finite.FiniteCheck`), before any averager changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from ..averagers import Averager
from ..config import AveragerSpec
from ..persistence import StateFileError
from .finite import FiniteCheck
from .layout import ShadowLayout
from .live import LiveWeights
from .runner import UpdateRunner, build_runner

#: what to do when θ_t holds NaN or inf at a start or update step
ON_NONFINITE = ("skip", "error")


class NonFiniteWeightsError(FloatingPointError):
    """θ_t held NaN or inf at an update step, with ``on_nonfinite="error"``."""


class AveragedWeights:
    """A running average of the weights a :class:`ShadowLayout` points at.

    ``step(t)`` drives the cadence of the spec (start at ``update_after``, then an update every
    ``update_every`` steps); the averager holds the math. The state lives in fp32 on
    ``device`` (the training device, or CPU when offloaded), one buffer per averager buffer,
    each sized like this rank's part of the weights. ``live_weights_may_move``: the live weights
    may stop being θ of the last step (``load_best_model_at_end``), see :meth:`AveragerSpec.build`.
    ``runner``: where updates run (default: inline); averages of the same live weights share one
    (:func:`step_together` then reads θ once for all of them). ``on_nonfinite``: ``"skip"`` a start or
    update whose θ_t holds NaN or inf (counted in the averager's counters, described in :attr:`skip_warning`),
    or ``"error"`` (raise :class:`NonFiniteWeightsError`).
    """

    def __init__(
        self,
        spec: AveragerSpec,
        layout: ShadowLayout,
        device: torch.device | str | None = None,
        live_weights_may_move: bool = False,
        runner: UpdateRunner | None = None,
        on_nonfinite: str = "skip",
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; allowed values: {' | '.join(ON_NONFINITE)}")
        self.spec = spec
        self.on_nonfinite = on_nonfinite
        self.layout = layout
        self.device = torch.device(device) if device is not None else layout.device
        self.averager: Averager = spec.build(live_weights_may_move)
        self.averager.allocate(layout.local_sizes(), self.device)
        self.runner = runner if runner is not None else build_runner("inline", layout, self.device)
        #: θ_t for outputs (BEMA's θ, the average before the start), read on the caller's stream
        self.live = self.runner.reader if self.runner.schedule != "worker" else LiveWeights(layout, self.device)
        # the cadence as submitted (the averager's own counters follow when the update has run)
        self._started = False
        self._last_step: int | None = None
        #: the warning of a skip that began a run of skipped updates, until the caller takes it
        self.skip_warning: str | None = None
        #: sharded: the fewest and the most updates any rank had skipped at the last save (:meth:`state_tensors`)
        self.rank_skips: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.spec.label

    # ------------------------------------------------------------- cadence
    @property
    def started(self) -> bool:
        """Whether averaging has started (as submitted: the start itself may still be running)."""
        return self._started

    @property
    def version(self) -> tuple[bool, int | None]:
        """Changes whenever an update or start is submitted (or state is loaded)."""
        return self._started, self._last_step

    def due(self, t: int) -> str | None:
        """``"start"``, ``"update"`` or None: what ``step(t)`` does."""
        if self._started and not self.averager.started:  # a submitted start: did it run, or was it skipped?
            self.wait()  # (only a worker may still run it)
            self._started = self.averager.started
        if not self._started:
            return "start" if t >= self.spec.update_after else None
        if self.spec.is_update_step(t) and t != self._last_step:
            return "update"
        return None

    def step(self, t: int) -> bool:
        """Fold in θ_t if ``t`` is a start or update step. Returns whether anything changed."""
        return step_together([self], t)

    def wait(self) -> None:
        """Block until every submitted update is visible to what the caller does next."""
        self.runner.wait()

    def theta(self) -> list[Tensor]:
        """This rank's live weights θ_t as fp32 tensors on the shadow device (a copy only if needed)."""
        return self.live.tensors()

    # -------------------------------------------------------------- output
    @torch.no_grad()
    def average_local(self, t: int) -> list[Tensor]:
        """This rank's part of the averaged weights (fp32; θ_t itself before averaging starts).

        Per-tensor views of one new flat tensor."""
        self.wait()
        averager = self.averager
        out = torch.empty(averager.total, dtype=torch.float32, device=self.device)
        if not averager.started:
            self.live.copy_into(out)
        elif not averager.flat_math:
            averager.average_into(list(out.split(averager.sizes)), self.live.tensors(), t)
        elif not averager.output_reads_theta():
            averager.average_into(out, None, t)
        else:
            for lo, hi, theta in self.live.parts():
                with averager.window(lo, hi):
                    averager.average_into(out[lo:hi], theta, t)
        return list(out.split(averager.sizes))

    @torch.no_grad()
    def averaged_tensors(self, t: int) -> dict[str, Tensor]:
        """Full averaged tensors by parameter name (collective under multi-process layouts)."""
        full = self.layout.gather(self.average_local(t))
        return dict(zip(self.layout.names, full, strict=True))

    @contextmanager
    def swapped_in(self, t: int) -> Iterator[None]:
        """Run the model with the averaged weights; restore the raw weights bit for bit afterwards."""
        with torch.no_grad():
            averaged = self.average_local(t)  # waits for the update, which may still read the live weights
            backup = [x.clone() for x in self.layout.local_tensors()]
            self.layout.write_local(averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                self.layout.write_local(backup)

    # --------------------------------------------------------------- state
    def memory_bytes(self) -> int:
        """Bytes of fp32 state (and scratch) this rank holds for this averager."""
        buffers = [*self.averager.buffers.values(), *self.averager.scratch.values()]
        return sum(b.numel() * b.element_size() for b in buffers)

    @torch.no_grad()
    def state_tensors(self) -> dict[str, Tensor]:
        """Full buffers, keyed ``"<buffer>/<parameter name>"`` (collective; sharded, it also updates
        :attr:`rank_skips`)."""
        self.wait()
        if self.layout.world_size > 1:
            self.rank_skips = self.skips_over_ranks()
        tensors: dict[str, Tensor] = {}
        for buffer in self.averager.buffers:
            full = self.layout.gather(self.averager.views(buffer))
            for name, tensor in zip(self.layout.names, full, strict=True):
                tensors[f"{buffer}/{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
        return tensors

    def state_metadata(self) -> dict[str, Any]:
        self.wait()
        return {
            "name": self.name,
            "spec": self.spec.model_dump(mode="json", exclude_unset=True),
            "update_every": self.spec.cadence,
            "hyperparameters": self.spec.hyperparameters(),
            "counters": self.averager.counters(),
            "parameters": {n: list(s) for n, s in zip(self.layout.names, self.layout.shapes, strict=True)},
        }

    def skip(self, t: int, kind: str) -> None:
        """θ_t holds NaN or inf: leave the state as it is and count it, or raise (``on_nonfinite``)."""
        averager = self.averager
        if self.on_nonfinite == "error":
            raise NonFiniteWeightsError(
                f"averager {self.name!r}: the trained weights hold NaN or inf at step {t} (on_nonfinite='error'); "
                "nothing of them entered the average. Lower the learning rate or clip gradients, resume from the "
                "last checkpoint, or set on_nonfinite='skip' to skip such steps"
            )
        if averager.started:
            kept = f"the average keeps its value of step {averager.last_update_step}"
        else:
            kept = "averaging starts at the next step whose weights are finite"
        streak_begins = not averager.skipped_since_update()
        averager.skip(t)
        if streak_begins:
            self.skip_warning = (
                f"averager {self.name!r} skipped its {kind} at step {t}: the trained weights hold NaN or inf "
                f"(on_nonfinite='skip'); {kept}, and every later step with non-finite weights is skipped too"
                f"{averager.skip_note()}"
            )

    def skips_over_ranks(self) -> tuple[int, int]:
        """The fewest and the most updates any rank skipped (collective when the weights are sharded: each rank
        skips the steps its own shard holds NaN or inf at, so the counts differ where only some shards did)."""
        skipped = self.averager.skipped_updates
        most, negative_least = self.layout.max_over_ranks([skipped, -skipped])
        return -negative_least, most

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Restore buffers and counters saved by :meth:`state_tensors` (any world size).

        A metadata block that lacks a part (``spec``, ``counters``, ``parameters``) is a :class:`StateFileError`.
        """
        self.wait()
        _check_blocks(metadata)
        saved_spec = AveragerSpec(**metadata["spec"])
        if saved_spec.method != self.spec.method:
            raise ValueError(
                f"checkpoint holds averager {self.name!r} with method={saved_spec.method!r}, "
                f"but this run asks for method={self.spec.method!r}"
            )
        changed = _changed_settings(saved_spec, self.spec)
        if changed:
            raise ValueError(
                f"checkpoint holds averager {self.name!r} with other settings than this run ({'; '.join(changed)}); "
                "resume with the saved settings, or give the new average another name"
            )
        saved_params = metadata["parameters"]
        expected = {n: list(s) for n, s in zip(self.layout.names, self.layout.shapes, strict=True)}
        if saved_params != expected:
            missing = sorted(set(expected) ^ set(saved_params))[:3]
            raise ValueError(
                f"checkpoint state of averager {self.name!r} tracks other parameters than this model "
                f"(first differences: {missing or 'shapes differ'})"
            )
        for buffer in self.averager.buffers:
            keys = [f"{buffer}/{n}" for n in self.layout.names]
            if any(k not in tensors for k in keys):
                raise ValueError(
                    f"checkpoint state of averager {self.name!r} lacks buffer {buffer!r}; "
                    + ("it is kept only with load_best_model_at_end=True or update_every > 1, so resume with the "
                       "saved run's load_best_model_at_end" if buffer == "theta_last" else "the checkpoint is incomplete")
                )  # fmt: skip
            local = self.layout.local_part([tensors[k] for k in keys])
            torch._foreach_copy_(self.averager.views(buffer), [x.to(self.device) for x in local])
        self.averager.load_counters(metadata["counters"])
        self._started, self._last_step = self.averager.started, self.averager.last_update_step


@torch.no_grad()
def step_together(weights: Sequence[AveragedWeights], t: int) -> bool:
    """Fold θ_t into every average of ``weights`` that is due at step ``t``, reading θ_t once.

    The averages share one runner (one set of live weights and one shadow device). Returns whether any
    changed. The averagers' counters advance inside the submitted update; :attr:`AveragedWeights.started`
    and the cadence advance here.
    """
    due = [(w, kind) for w in weights if (kind := w.due(t)) is not None]
    if not due:
        return False
    runner = due[0][0].runner
    if any(w.runner is not runner for w, _ in due):
        raise ValueError("step_together() needs averages that share one runner")
    for w, _ in due:
        w._started, w._last_step = True, t
    runner.submit(lambda on_read: _apply(due, t, runner, on_read))
    return True


#: one part of θ_t as :meth:`LiveWeights.parts` yields it: ``(lo, hi, θ[lo:hi])``
Part = tuple[int, int, Any]


def _apply(
    due: list[tuple[AveragedWeights, str]],
    t: int,
    runner: UpdateRunner,
    on_read: Callable[[], None],
) -> None:
    """The update job: θ_t from ``runner.reader`` into every due averager (flat math chunk by chunk, else per tensor).

    When θ_t holds NaN or inf (:func:`_check_theta`), each due averager skips step ``t`` instead (or raises),
    before any of them changes. Sharded weights: each rank checks, and skips, on its own shard (no collective per
    step; the ranks compare their counts when saving, :attr:`AveragedWeights.rank_skips`).
    """
    reader = runner.reader
    flat = [(w.averager, kind) for w, kind in due if w.averager.flat_math]
    lists = [(w.averager, kind) for w, kind in due if not w.averager.flat_math]
    parts = reader.parts(on_read) if flat else iter(())
    first = next(parts, None)  # θ_t read (and converted) once, for the check and the math
    first, finite = _check_theta(runner.finite, reader, first)
    if not finite:
        for _ in parts:  # the read ends (and calls on_read)
            pass
        if not flat:
            on_read()
        for w, kind in due:
            w.skip(t, kind)
        return
    with ExitStack() as counters:
        for averager, kind in [*lists, *flat]:
            counters.enter_context(averager.starting(t) if kind == "start" else averager.updating(t))
        if lists:
            theta = reader.tensors()
            for averager, kind in lists:
                (averager._start if kind == "start" else averager._update)(theta, t)
        if flat:
            for lo, hi, part in itertools.chain([first] if first is not None else [], parts):
                for averager, kind in flat:
                    with averager.window(lo, hi):
                        (averager._start if kind == "start" else averager._update)(part, t)
        else:
            on_read()


def _check_theta(check: FiniteCheck, reader: LiveWeights, first: Part | None) -> tuple[Part | None, bool]:
    """Whether θ_t is finite, on what the update job reads (the live weights, the staging buffer, or a worker's
    host copy: no wait on the training device), and the first part of θ_t for the math.

    ``first`` (the reader's first part) is the whole of θ_t: the check reads it; a list of small tensors is
    checked, and then averaged, as one flat copy (:meth:`FiniteCheck.flat_copy`). θ_t in several chunks (or read
    per tensor): the check is a pass of its own over the reader's source, before the math.
    """
    if first is not None and first[0] == 0 and first[1] == reader.total:
        theta = first[2]
        copy = check.flat_copy(theta) if isinstance(theta, list) else None
        if copy is not None:
            return (0, reader.total, copy), check(copy)
        return first, check(theta)
    source = getattr(reader.source, "flat", None)  # the live weights as one tensor, when they are laid out so
    return first, check(source if source is not None else reader.source.local_tensors())


_COUNTERS = ("num_updates", "started_at", "last_update_step")


def _check_blocks(metadata: dict[str, Any]) -> None:
    missing = [k for k in ("spec", "counters", "parameters") if not isinstance(metadata.get(k), dict)]
    if missing:
        raise StateFileError(f"the averager state lacks its {' and '.join(repr(k) for k in missing)} block")
    lacking = [k for k in _COUNTERS if k not in metadata["counters"]]
    if lacking:
        raise StateFileError(f"the averager state's 'counters' block lacks {', '.join(repr(k) for k in lacking)}")


def _settings(spec: AveragerSpec) -> dict[str, Any]:
    return {"update_after": spec.update_after, "update_every": spec.cadence, **spec.hyperparameters()}


def _changed_settings(saved: AveragerSpec, requested: AveragerSpec) -> list[str]:
    """``key: saved → requested`` for every setting of the average that differs."""
    old, new = _settings(saved), _settings(requested)
    return [
        f"{key}: {old.get(key)!r} → {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
