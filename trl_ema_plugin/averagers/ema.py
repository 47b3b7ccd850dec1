"""Exponential moving average with a fixed decay, or diffusers' warm-up."""

from __future__ import annotations

from .base import Averager
from .ops import Tensors, copy_, lerp_
from .registry import register_averager
from .schedules import EMADecay, field_names, schedule_for


@register_averager("ema")
class EMA(Averager):
    r"""EMA_n = d_n · EMA_{n−1} + (1 − d_n) · θ_t, with EMA_0 = θ at ``update_after``.

    d_n = ``decay`` by default. With ``use_ema_warmup`` the decay ramps up as in
    diffusers' ``EMAModel``: d_n = min(decay, 1 − (1 + n/inv_gamma)^(−power)),
    n = number of updates so far (:class:`.schedules.EMADecay`). Implemented as
    ``lerp_(EMA, θ, 1 − d_n)``: one pass over the flat buffer.

    Memory: one fp32 copy of the tracked weights.
    """

    buffer_names = ("ema",)
    hyperparameters = field_names(EMADecay)
    flat_math = True

    def __init__(self, **decay: float) -> None:
        super().__init__()
        self.schedule: EMADecay = schedule_for(type(self), EMADecay, decay)

    def _start(self, theta: Tensors, t: int) -> None:
        copy_(self.state("ema", theta), theta)

    def _update(self, theta: Tensors, t: int) -> None:
        lerp_(self.state("ema", theta), theta, 1.0 - self.schedule.at(self.num_updates))

    def output_reads_theta(self) -> bool:
        return False

    def average_into(self, out: Tensors, theta: Tensors | None, t: int) -> None:
        copy_(out, self.state("ema", out))
