"""OUEMA: EMA of Ornstein–Uhlenbeck-debiased weights, a comparison method in the BEMA paper."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Averager, copy_all
from .registry import register_averager
from .schedules import BEMASchedule, field_names, schedule_for


@register_averager("ouema")
class OUEMA(Averager):
    r"""θ̂_t = EMA_t of  z_t = (θ_t − α_t·θ_0) / (1 − α_t)

    EMA_t = lerp(EMA_{t−1}, z_t, β_t); α_t, β_t as in BEMA (:class:`.schedules.BEMASchedule`);
    θ_0 = EMA = θ at ``update_after``. Formula from the BEMA authors' ``src/core_offline.py``
    (github abblock/bema, class ``OUEMA``; their ``eta_power`` is our ``bias_power``). Their code
    divides by zero when α_t = 1 (t = 0); here z_t = θ_t whenever 1 − α_t < 1e-6.

    Memory: two fp32 copies (θ_0, EMA) plus one transient copy for z_t during an update.
    """

    buffer_names = ("theta0", "ema")
    hyperparameters = field_names(BEMASchedule)

    def __init__(self, **schedule: float) -> None:
        super().__init__()
        self.schedule: BEMASchedule = schedule_for(type(self), BEMASchedule, schedule)

    def debiased(self, theta: list[Tensor], t: int) -> list[Tensor]:
        """z_t = (θ_t − α_t θ_0)/(1 − α_t), or θ_t when α_t ≈ 1."""
        alpha = self.schedule.alpha(t)
        if 1.0 - alpha < 1e-6:
            return theta
        z = torch._foreach_mul(self.views("theta0"), -alpha)
        torch._foreach_add_(z, theta)
        torch._foreach_div_(z, 1.0 - alpha)
        return z

    def _start(self, theta: list[Tensor], t: int) -> None:
        copy_all(self.views("theta0"), theta)
        copy_all(self.views("ema"), theta)

    def _update(self, theta: list[Tensor], t: int) -> None:
        torch._foreach_lerp_(self.views("ema"), self.debiased(theta, t), self.schedule.beta(t))

    def average_into(self, out: list[Tensor], theta: list[Tensor], t: int) -> None:
        copy_all(out, self.views("ema"))
