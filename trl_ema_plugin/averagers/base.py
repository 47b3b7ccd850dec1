"""The averager interface: pure math on the tracked weights, as one flat fp32 vector or a list of tensors.

An averager never sees a model, a trainer or a process group. It receives the
live weights θ_t (already flattened, possibly one rank's shard) and keeps its
running state in flat fp32 buffers, one element per tracked weight, with cached
per-tensor views (:meth:`Averager.views`).

Life cycle, driven by :class:`trl_ema_plugin.shadow.AveragedWeights`:

* ``allocate(sizes, device)`` once;
* ``start(theta, t)`` at ``t == update_after`` (snapshot, e.g. θ0 and EMA_0);
* ``update(theta, t)`` at each later update step;
* ``average_into(out, theta, t)`` whenever the averaged weights are needed.

θ is a list of per-tensor fp32 tensors (sizes as allocated). An averager that sets
:attr:`Averager.flat_math` also takes θ as one flat fp32 tensor, possibly a *window*
``[lo, hi)`` of the concatenated weights (the store then calls ``_start``/``_update`` once
per window between :meth:`Averager.starting` / :meth:`Averager.updating`), and writes its
formula with :mod:`.ops` on :meth:`Averager.state`, so that one kernel covers every tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from .ops import Tensors


class Averager(ABC):
    """Base class of every running average of the weights."""

    #: registry name, e.g. ``"ema"``
    method: ClassVar[str]
    #: names of the fp32 state buffers, each one copy of the tracked weights
    buffer_names: ClassVar[tuple[str, ...]]
    #: names of fp32 scratch buffers (one copy each, never saved), e.g. OUEMA's z_t
    scratch_names: ClassVar[tuple[str, ...]] = ()
    #: the keyword arguments users set (``AveragerSpec`` fields / YAML keys, or ``options`` for names that are not
    #: fields); every subclass declares them, ``()`` for none. Other constructor arguments are not settings.
    hyperparameters: ClassVar[tuple[str, ...]]
    #: whether the output reads θ at the last update: then the constructor takes ``keep_last_weights``, and the
    #: spec sets it when the live weights can differ from that θ (see ``AveragerSpec.build``)
    output_reads_last_update: ClassVar[bool] = False
    #: whether ``_start``/``_update``/``average_into`` also take θ (and ``out``) as one flat fp32 tensor, a window of
    #: the concatenated weights, reading their buffers through :meth:`state`. Otherwise they get lists.
    flat_math: ClassVar[bool] = False

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}
        self.scratch: dict[str, Tensor] = {}
        self.sizes: list[int] = []
        self.total = 0
        self.num_updates = 0  # updates applied after start (start itself is not counted)
        self.started_at: int | None = None
        self.last_update_step: int | None = None
        self._views: dict[str, list[Tensor]] = {}
        self._window: tuple[int, int] | None = None  # None: every element

    # ----------------------------------------------------------------- state
    def allocate(self, sizes: list[int], device: torch.device | str) -> None:
        """One flat fp32 buffer per name in :attr:`buffer_names` and :attr:`scratch_names`, with per-tensor views."""
        self.sizes = list(sizes)
        self.total = sum(sizes)

        def flat() -> Tensor:
            return torch.zeros(self.total, dtype=torch.float32, device=device)

        self.buffers = {name: flat() for name in self.active_buffer_names()}
        self.scratch = {name: flat() for name in self.scratch_names}
        self._views = {name: list(torch.split(b, self.sizes)) for name, b in {**self.buffers, **self.scratch}.items()}

    def active_buffer_names(self) -> tuple[str, ...]:
        """The buffers this instance needs (a subclass may drop optional ones)."""
        return self.buffer_names

    def views(self, name: str) -> list[Tensor]:
        """Per-tensor views of buffer ``name``, in the order of :attr:`sizes` (made once, at :meth:`allocate`)."""
        return list(self._views[name])

    def state(self, name: str, like: Tensors | None = None) -> Tensors:
        """Buffer ``name`` (state or scratch) in the form of ``like``: its per-tensor views when ``like`` is a list,
        else the flat buffer, restricted to the current window."""
        if isinstance(like, list):
            if self._window is not None:
                raise RuntimeError("per-tensor θ cannot be used inside a window of the flat buffers")
            return self._views[name]
        buffer = self.buffers[name] if name in self.buffers else self.scratch[name]
        if self._window is None:
            return buffer
        lo, hi = self._window
        return buffer[lo:hi]

    def split_like(self, x: Tensors, like: Tensors) -> Tensors:
        """``x`` in the form of ``like``: a flat ``x`` split into per-tensor views when ``like`` is a list."""
        if isinstance(like, list) and isinstance(x, Tensor):
            return list(x.split(self.sizes))
        return x

    @contextmanager
    def window(self, lo: int, hi: int) -> Iterator[None]:
        """Restrict :meth:`state` to elements ``[lo, hi)`` of the concatenated weights (θ is that part)."""
        whole = lo == 0 and hi == self.total
        previous, self._window = self._window, None if whole else (lo, hi)
        try:
            yield
        finally:
            self._window = previous

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
    def start(self, theta: Tensors, t: int) -> None:
        """Initialise the running state from θ_t at the first averaging step."""
        with self.starting(t):
            self._start(theta, t)

    def update(self, theta: Tensors, t: int) -> None:
        """Fold θ_t into the running state."""
        with self.updating(t):
            self._update(theta, t)

    @contextmanager
    def starting(self, t: int) -> Iterator[None]:
        """The counters of a start at step ``t``, around one or more ``_start`` calls (one per window)."""
        yield
        self.started_at = t
        self.last_update_step = t
        self.num_updates = 0

    @contextmanager
    def updating(self, t: int) -> Iterator[None]:
        """The counters of an update at step ``t``, around one or more ``_update`` calls (one per window)."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__}.update() called before start()")
        self.num_updates += 1
        yield
        self.last_update_step = t

    @abstractmethod
    def _start(self, theta: Tensors, t: int) -> None: ...

    @abstractmethod
    def _update(self, theta: Tensors, t: int) -> None: ...

    @abstractmethod
    def average_into(self, out: Tensors, theta: Tensors, t: int) -> None:
        """Write the averaged weights into ``out`` (fp32), given the live θ_t."""

    def output_reads_theta(self) -> bool:
        """Whether :meth:`average_into` reads θ_t; when not, the store passes ``theta=None``."""
        return True


def copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i] ← src[i]`` for all i, in one foreach call."""
    torch._foreach_copy_(dst, src)
