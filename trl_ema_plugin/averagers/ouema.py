"""OUEMA: EMA of Ornstein–Uhlenbeck-debiased weights, a comparison method in the BEMA paper."""

from __future__ import annotations

from .base import Averager
from .ops import Tensors, add_, copy_, div_, lerp_, mul_into
from .registry import register_averager
from .schedules import BEMASchedule, field_names, schedule_for


@register_averager("ouema")
class OUEMA(Averager):
    r"""θ̂_t = EMA_t of  z_t = (θ_t − α_t·θ_0) / (1 − α_t)

    EMA_t = lerp(EMA_{t−1}, z_t, β_t); α_t, β_t as in BEMA (:class:`.schedules.BEMASchedule`);
    θ_0 = EMA = θ at ``update_after``. Formula from the BEMA authors' ``src/core_offline.py``
    (github abblock/bema, class ``OUEMA``; their ``eta_power`` is our ``bias_power``). Their code
    divides by zero when α_t = 1 (t = 0); here z_t = θ_t whenever 1 − α_t < 1e-6.

    Memory: two fp32 copies (θ_0, EMA) plus one scratch copy that holds z_t during an update.
    """

    buffer_names = ("theta0", "ema")
    scratch_names = ("z",)
    hyperparameters = field_names(BEMASchedule)
    flat_math = True

    def __init__(self, **schedule: float) -> None:
        super().__init__()
        self.schedule: BEMASchedule = schedule_for(type(self), BEMASchedule, schedule)

    def debiased(self, theta: Tensors, t: int) -> Tensors:
        """z_t = (θ_t − α_t θ_0)/(1 − α_t) in the scratch buffer (flat), or θ_t when α_t ≈ 1."""
        alpha = self.schedule.alpha(t)
        if 1.0 - alpha < 1e-6:
            return theta
        z = self.state("z")
        mul_into(z, self.state("theta0"), -alpha)
        add_(self.split_like(z, theta), theta)
        div_(z, 1.0 - alpha)
        return z

    def _start(self, theta: Tensors, t: int) -> None:
        copy_(self.state("theta0", theta), theta)
        copy_(self.state("ema", theta), theta)

    def _update(self, theta: Tensors, t: int) -> None:
        z = self.debiased(theta, t)
        lerp_(self.state("ema", z), z, self.schedule.beta(t))

    def output_reads_theta(self) -> bool:
        return False

    def average_into(self, out: Tensors, theta: Tensors | None, t: int) -> None:
        copy_(out, self.state("ema", out))
