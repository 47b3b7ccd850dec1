"""DEMA: double EMA, a comparison method in the BEMA paper."""

from __future__ import annotations

from .base import Averager
from .ops import Tensors, copy_, lerp_, mul_, sub_
from .registry import register_averager
from .schedules import BEMASchedule, field_names, schedule_for


@register_averager("dema")
class DEMA(Averager):
    r"""θ̂_t = 2·EMA_t − EMA²_t,  EMA_t = lerp(EMA_{t−1}, θ_t, β_t),  EMA²_t = lerp(EMA²_{t−1}, EMA_t, β_t)

    β_t as in BEMA (:class:`.schedules.BEMASchedule`; α_t and so ``bias_power`` and ``bias_horizon`` are not used). Both
    EMAs start at θ at ``update_after``. Formula from the BEMA authors' ``src/core_offline.py``
    (github abblock/bema, class ``DEMA``); names follow TRL's BEMA (their ``ema_gamma`` is our
    ``multiplier``, ``scaling_lag`` our ``lag``). An update is two ``lerp`` passes.

    Memory: two fp32 copies.
    """

    buffer_names = ("ema", "ema_of_ema")
    hyperparameters = tuple(n for n in field_names(BEMASchedule) if n not in ("bias_power", "bias_horizon"))
    flat_math = True

    def __init__(self, **schedule: float) -> None:
        super().__init__()
        self.schedule: BEMASchedule = schedule_for(type(self), BEMASchedule, schedule)

    def _start(self, theta: Tensors, t: int) -> None:
        copy_(self.state("ema", theta), theta)
        copy_(self.state("ema_of_ema", theta), theta)

    def _update(self, theta: Tensors, t: int) -> None:
        beta = self.schedule.beta(t)
        lerp_(self.state("ema", theta), theta, beta)
        lerp_(self.state("ema_of_ema"), self.state("ema"), beta)  # state only: one flat pass

    def output_reads_theta(self) -> bool:
        return False

    def average_into(self, out: Tensors, theta: Tensors | None, t: int) -> None:
        # out = 2·EMA − EMA²
        copy_(out, self.state("ema", out))
        mul_(out, 2.0)
        sub_(out, self.state("ema_of_ema", out))
