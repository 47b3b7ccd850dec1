"""The shadow store: one averager's fp32 state for the tracked weights, on device or offloaded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..averagers import Averager
from ..config import AveragerSpec
from .layout import ShadowLayout


class AveragedWeights:
    """A running average of the weights a :class:`ShadowLayout` points at.

    ``step(t)`` drives the cadence of the spec (start at ``update_after``, then an update every
    ``update_every`` steps); the averager holds the math. The state lives in fp32 on
    ``device`` (the training device, or CPU when offloaded), one buffer per averager buffer,
    each sized like this rank's part of the weights. ``live_weights_may_move``: the live weights
    may stop being θ of the last step (``load_best_model_at_end``), see :meth:`AveragerSpec.build`.
    """

    def __init__(
        self,
        spec: AveragerSpec,
        layout: ShadowLayout,
        device: torch.device | str | None = None,
        live_weights_may_move: bool = False,
    ) -> None:
        self.spec = spec
        self.layout = layout
        self.device = torch.device(device) if device is not None else layout.device
        self.averager: Averager = spec.build(live_weights_may_move)
        self.averager.allocate(layout.local_sizes(), self.device)

    @property
    def name(self) -> str:
        return self.spec.label

    # ------------------------------------------------------------- cadence
    def theta(self) -> list[Tensor]:
        """This rank's live weights θ_t as fp32 tensors on the shadow device (a copy only if needed)."""
        live = self.layout.local_tensors()
        return [t.to(device=self.device, dtype=torch.float32) for t in live]

    @torch.no_grad()
    def step(self, t: int) -> bool:
        """Fold in θ_t if ``t`` is a start or update step. Returns whether anything changed."""
        if not self.averager.started:
            if t < self.spec.update_after:
                return False
            self.averager.start(self.theta(), t)
            return True
        if self.spec.is_update_step(t) and t != self.averager.last_update_step:
            self.averager.update(self.theta(), t)
            return True
        return False

    # -------------------------------------------------------------- output
    @torch.no_grad()
    def average_local(self, t: int) -> list[Tensor]:
        """This rank's part of the averaged weights (fp32; θ_t itself before averaging starts)."""
        if not self.averager.started:
            return [x.to(device=self.device, dtype=torch.float32, copy=True) for x in self.layout.local_tensors()]
        theta = self.theta()
        out = [torch.empty_like(x) for x in theta]
        self.averager.average_into(out, theta, t)
        return out

    @torch.no_grad()
    def averaged_tensors(self, t: int) -> dict[str, Tensor]:
        """Full averaged tensors by parameter name (collective under multi-process layouts)."""
        full = self.layout.gather(self.average_local(t))
        return dict(zip(self.layout.names, full, strict=True))

    @contextmanager
    def swapped_in(self, t: int) -> Iterator[None]:
        """Run the model with the averaged weights; restore the raw weights bit for bit afterwards."""
        with torch.no_grad():
            backup = [x.clone() for x in self.layout.local_tensors()]
            self.layout.write_local(self.average_local(t))
        try:
            yield
        finally:
            with torch.no_grad():
                self.layout.write_local(backup)

    # --------------------------------------------------------------- state
    def memory_bytes(self) -> int:
        """Bytes of fp32 state this rank holds."""
        return sum(b.numel() * b.element_size() for b in self.averager.buffers.values())

    @torch.no_grad()
    def state_tensors(self) -> dict[str, Tensor]:
        """Full buffers, keyed ``"<buffer>/<parameter name>"`` (collective)."""
        tensors: dict[str, Tensor] = {}
        for buffer in self.averager.buffers:
            full = self.layout.gather(self.averager.views(buffer))
            for name, tensor in zip(self.layout.names, full, strict=True):
                tensors[f"{buffer}/{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
        return tensors

    def state_metadata(self) -> dict[str, Any]:
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
