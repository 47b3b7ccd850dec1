"""The shadow store: one averager's fp32 state for the tracked weights, on device or offloaded.

An update costs per byte: θ_t reaches the averager's math in place (fp32 live weights on the shadow
device) or through one conversion into a persistent flat fp32 staging buffer
(:class:`~trl_ema_plugin.shadow.live.LiveWeights`), read once per step for every averager that is due
(:func:`step_together`), and each op of the formula is one kernel over the flat buffers. The update runs
inline, on a side CUDA stream or in a background worker (:mod:`~trl_ema_plugin.shadow.runner`); every
method that reads the averages waits for it first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from ..averagers import Averager
from ..config import AveragerSpec
from .layout import ShadowLayout
from .live import LiveWeights
from .runner import UpdateRunner, build_runner


class AveragedWeights:
    """A running average of the weights a :class:`ShadowLayout` points at.

    ``step(t)`` drives the cadence of the spec (start at ``update_after``, then an update every
    ``update_every`` steps); the averager holds the math. The state lives in fp32 on
    ``device`` (the training device, or CPU when offloaded), one buffer per averager buffer,
    each sized like this rank's part of the weights. ``live_weights_may_move``: the live weights
    may stop being θ of the last step (``load_best_model_at_end``), see :meth:`AveragerSpec.build`.
    ``runner``: where updates run (default: inline); averages of the same live weights share one
    (:func:`step_together` then reads θ once for all of them).
    """

    def __init__(
        self,
        spec: AveragerSpec,
        layout: ShadowLayout,
        device: torch.device | str | None = None,
        live_weights_may_move: bool = False,
        runner: UpdateRunner | None = None,
    ) -> None:
        self.spec = spec
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
        """Full buffers, keyed ``"<buffer>/<parameter name>"`` (collective)."""
        self.wait()
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

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Restore buffers and counters saved by :meth:`state_tensors` (any world size)."""
        self.wait()
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
    runner.submit(lambda on_read: _apply(due, t, runner.reader, on_read))
    return True


def _apply(due: list[tuple[AveragedWeights, str]], t: int, reader: LiveWeights, on_read: Any) -> None:
    """The update job: θ_t from ``reader`` into every due averager (flat math chunk by chunk, else per tensor)."""
    flat = [(w.averager, kind) for w, kind in due if w.averager.flat_math]
    lists = [(w.averager, kind) for w, kind in due if not w.averager.flat_math]
    with ExitStack() as counters:
        for averager, kind in [*lists, *flat]:
            counters.enter_context(averager.starting(t) if kind == "start" else averager.updating(t))
        if lists:
            theta = reader.tensors()
            for averager, kind in lists:
                (averager._start if kind == "start" else averager._update)(theta, t)
        if flat:
            for lo, hi, part in reader.parts(on_read):
                for averager, kind in flat:
                    with averager.window(lo, hi):
                        (averager._start if kind == "start" else averager._update)(part, t)
        else:
            on_read()


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
