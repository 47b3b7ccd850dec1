"""BEMA: bias-corrected exponential moving average (Block & Zhang, arXiv 2508.00180)."""

from __future__ import annotations

from .base import Averager
from .ops import Tensors, add_, copy_, lerp_, mul_, sub_
from .registry import register_averager
from .schedules import BEMASchedule, field_names, schedule_for


@register_averager("bema")
class BEMA(Averager):
    r"""θ̂_t = α_t · (θ_t − θ_0) + EMA_t,   EMA_t = (1 − β_t) · EMA_{t−1} + β_t · θ_t

    with β_t = max((ρ + γ·t)^(−κ), β_min) and α_t = (ρ + γ·t)^(−η) (:class:`.schedules.BEMASchedule`),
    t the absolute optimizer step, θ_0 = EMA = θ at t = τ (``update_after``). This is the
    paper's estimator and what ``trl.BEMACallback`` computes (README, "Where we differ from TRL
    and diffusers": the base ρ + γt is clamped at 1, and before the first update the output is θ at
    τ, not θ at the start); hyper-parameter names are TRL's: ``ema_power`` κ, ``bias_power`` η, ``lag`` ρ, ``multiplier`` γ,
    ``min_ema_multiplier`` β_min. An update is one ``lerp`` pass (plus one copy with ``keep_last_weights``).

    Memory: two fp32 copies (θ_0, EMA). The output needs θ at the last update step; when the
    live weights can differ from it (``keep_last_weights``: updates sparser than steps, or the
    trainer loading the best checkpoint at the end), a third copy keeps it, because θ̂ must not
    mix the EMA of step t with other weights.
    """

    buffer_names = ("theta0", "ema", "theta_last")
    hyperparameters = field_names(BEMASchedule)
    output_reads_last_update = True
    flat_math = True

    def __init__(self, keep_last_weights: bool = False, **schedule: float) -> None:
        super().__init__()
        self.schedule: BEMASchedule = schedule_for(type(self), BEMASchedule, schedule)
        self.keep_last_weights = keep_last_weights

    def active_buffer_names(self) -> tuple[str, ...]:
        return self.buffer_names if self.keep_last_weights else ("theta0", "ema")

    def _remember(self, theta: Tensors) -> None:
        if self.keep_last_weights:
            copy_(self.state("theta_last", theta), theta)

    def _start(self, theta: Tensors, t: int) -> None:
        copy_(self.state("theta0", theta), theta)
        copy_(self.state("ema", theta), theta)
        self._remember(theta)

    def _update(self, theta: Tensors, t: int) -> None:
        lerp_(self.state("ema", theta), theta, self.schedule.beta(t))
        self._remember(theta)

    def output_reads_theta(self) -> bool:
        return not self.keep_last_weights  # else θ of the last update is kept in theta_last

    def average_into(self, out: Tensors, theta: Tensors | None, t: int) -> None:
        at_update = self.last_update_step
        assert at_update is not None
        if self.keep_last_weights:
            theta = self.state("theta_last", out)  # the live weights may be newer, or another checkpoint's
        elif at_update != t:
            raise RuntimeError(
                f"BEMA needs θ from its last update (step {at_update}) at step {t}; "
                "build it with keep_last_weights=True when update_every > 1"
            )
        assert theta is not None
        alpha = self.schedule.alpha(at_update)
        # out = EMA + α (θ − θ0)
        copy_(self.split_like(out, theta), theta)
        sub_(out, self.state("theta0", out))
        mul_(out, alpha)
        add_(out, self.state("ema", out))
