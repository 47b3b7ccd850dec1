"""The averager interface: pure math on lists of fp32 tensors.

An averager never sees a model, a trainer or a process group. It receives the
live weights θ_t as a list of tensors (already flattened, possibly one rank's
shard) and keeps its running state in fp32 buffers of the same sizes.

Life cycle, driven by :class:`trl_ema_plugin.shadow.AveragedWeights`:

* ``allocate(sizes, device)`` once;
* ``start(theta, t)`` at ``t == update_after`` (snapshot, e.g. θ0 and EMA_0);
* ``update(theta, t)`` at each later update step;
* ``average_into(out, theta, t)`` whenever the averaged weights are needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor


class Averager(ABC):
    """Base class of every running average of the weights."""

    #: registry name, e.g. ``"ema"``
    method: ClassVar[str]
    #: names of the fp32 state buffers, each one copy of the tracked weights
    buffer_names: ClassVar[tuple[str, ...]]
    #: the keyword arguments users set (``AveragerSpec`` fields / YAML keys, or ``options`` for names that are not
    #: fields); every subclass declares them, ``()`` for none. Other constructor arguments are not settings.
    hyperparameters: ClassVar[tuple[str, ...]]
    #: whether the output reads θ at the last update: then the constructor takes ``keep_last_weights``, and the
    #: spec sets it when the live weights can differ from that θ (see ``AveragerSpec.build``)
    output_reads_last_update: ClassVar[bool] = False

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}
        self.sizes: list[int] = []
        self.num_updates = 0  # updates applied after start (start itself is not counted)
        self.started_at: int | None = None
        self.last_update_step: int | None = None

    # ----------------------------------------------------------------- state
    def allocate(self, sizes: list[int], device: torch.device | str) -> None:
        """Allocate one flat fp32 buffer per name in :attr:`buffer_names`."""
        self.sizes = list(sizes)
        total = sum(sizes)
        self.buffers = {
            name: torch.zeros(total, dtype=torch.float32, device=device) for name in self.active_buffer_names()
        }

    def active_buffer_names(self) -> tuple[str, ...]:
        """The buffers this instance needs (a subclass may drop optional ones)."""
        return self.buffer_names

    def views(self, name: str) -> list[Tensor]:
        """Per-tensor views of buffer ``name``, in the order of :attr:`sizes`."""
        return list(torch.split(self.buffers[name], self.sizes))

    @property
    def started(self) -> bool:
        return self.started_at is not None

    def counters(self) -> dict[str, Any]:
        """Scalars that, with the buffers, restore the averager exactly."""
        return {
            "num_updates": self.num_updates,
            "started_at": self.started_at,
            "last_update_step": self.last_update_step,
        }

    def load_counters(self, counters: dict[str, Any]) -> None:
        self.num_updates = int(counters["num_updates"])
        self.started_at = counters["started_at"]
        self.last_update_step = counters["last_update_step"]

    # ------------------------------------------------------------------ math
    def start(self, theta: list[Tensor], t: int) -> None:
        """Initialise the running state from θ_t at the first averaging step."""
        self._start(theta, t)
        self.started_at = t
        self.last_update_step = t
        self.num_updates = 0

    def update(self, theta: list[Tensor], t: int) -> None:
        """Fold θ_t into the running state."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__}.update() called before start()")
        self.num_updates += 1
        self._update(theta, t)
        self.last_update_step = t

    @abstractmethod
    def _start(self, theta: list[Tensor], t: int) -> None: ...

    @abstractmethod
    def _update(self, theta: list[Tensor], t: int) -> None: ...

    @abstractmethod
    def average_into(self, out: list[Tensor], theta: list[Tensor], t: int) -> None:
        """Write the averaged weights into ``out`` (fp32), given the live θ_t."""


def copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i] ← src[i]`` for all i, in one foreach call."""
    torch._foreach_copy_(dst, src)
