"""DEMA: double EMA, a comparison method in the BEMA paper."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Averager, copy_all
from .registry import register_averager
from .schedules import BEMASchedule, field_names, schedule_for


@register_averager("dema")
class DEMA(Averager):
    r"""θ̂_t = 2·EMA_t − EMA²_t,  EMA_t = lerp(EMA_{t−1}, θ_t, β_t),  EMA²_t = lerp(EMA²_{t−1}, EMA_t, β_t)

    β_t as in BEMA (:class:`.schedules.BEMASchedule`; α_t and so ``bias_power`` are not used). Both
    EMAs start at θ at ``update_after``. Formula from the BEMA authors' ``src/core_offline.py``
    (github abblock/bema, class ``DEMA``); names follow TRL's BEMA (their ``ema_gamma`` is our
    ``multiplier``, ``scaling_lag`` our ``lag``).

    Memory: two fp32 copies.
    """

    buffer_names = ("ema", "ema_of_ema")
    hyperparameters = tuple(n for n in field_names(BEMASchedule) if n != "bias_power")

    def __init__(self, **schedule: float) -> None:
        super().__init__()
        self.schedule: BEMASchedule = schedule_for(type(self), BEMASchedule, schedule)

    def _start(self, theta: list[Tensor], t: int) -> None:
        copy_all(self.views("ema"), theta)
        copy_all(self.views("ema_of_ema"), theta)

    def _update(self, theta: list[Tensor], t: int) -> None:
        beta = self.schedule.beta(t)
        ema = self.views("ema")
        torch._foreach_lerp_(ema, theta, beta)
        torch._foreach_lerp_(self.views("ema_of_ema"), ema, beta)

    def average_into(self, out: list[Tensor], theta: list[Tensor], t: int) -> None:
        # out = 2·EMA − EMA²
        copy_all(out, self.views("ema"))
        torch._foreach_mul_(out, 2.0)
        torch._foreach_sub_(out, self.views("ema_of_ema"))
