"""Step-size schedules shared by the averagers.

Notation of the BEMA paper (arXiv 2508.00180), as TRL's ``BEMACallback`` computes it,
with t the absolute optimizer step (``global_step``), not t − τ:

    β_t = max((ρ + γ·t)^(−κ), β_min)     EMA step size   (κ = ema_power, β_min = min_ema_multiplier)
    α_t = (ρ + γ·t)^(−η) · f_t           bias-correction (η = bias_power)
    f_t = max(0, 1 − t/H), or 1          fade of α_t to 0 at step H (H = bias_horizon, unset: f_t = 1)

The fade is ours, not the paper's nor TRL's: with a learning rate that decays to 0 the weights stop
drifting at the end of the run, and any α_t > 0 then extrapolates θ̂ past θ_T (docs/evidence.md, issue 11).

ρ = ``lag``, γ = ``multiplier``. The base ρ + γ·t is clamped at 1 so that β_t, α_t ≤ 1
(TRL would raise ``ZeroDivisionError`` at ρ + γ·t = 0).

The authors' own repository (github abblock/bema, ``src/core_online.py``) uses another
parametrization, γ·(1 + max(0, t − ρ))^(−κ); we follow the paper and TRL.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def schedule_base(t: int, lag: float, multiplier: float) -> float:
    """ρ + γ·t, clamped at 1."""
    return max(lag + multiplier * t, 1.0)


def ema_step_size(t: int, lag: float, multiplier: float, ema_power: float, min_ema_multiplier: float) -> float:
    """β_t = max((ρ + γ·t)^(−κ), β_min)."""
    return max(schedule_base(t, lag, multiplier) ** (-ema_power), min_ema_multiplier)


def bias_correction(
    t: int, lag: float, multiplier: float, bias_power: float, bias_horizon: float | None = None
) -> float:
    """α_t = (ρ + γ·t)^(−η) · max(0, 1 − t/H), the last factor only with a horizon H."""
    fade = 1.0 if bias_horizon is None else max(0.0, 1.0 - t / bias_horizon)
    return schedule_base(t, lag, multiplier) ** (-bias_power) * fade


def warmup_decay(n: int, decay: float, inv_gamma: float, power: float) -> float:
    """Diffusers' EMA warm-up: d_n = min(d, 1 − (1 + n/inv_gamma)^(−power)), n = updates so far."""
    return min(decay, 1.0 - (1.0 + n / inv_gamma) ** (-power))


@dataclass(frozen=True)
class BEMASchedule:
    """The schedule of BEMA, DEMA and OUEMA: β_t = max((ρ + γ·t)^(−κ), β_min), α_t = (ρ + γ·t)^(−η)·f_t.

    Field names and defaults are TRL ``BEMACallback``'s: ``ema_power`` κ, ``bias_power`` η,
    ``lag`` ρ, ``multiplier`` γ, ``min_ema_multiplier`` β_min; ``bias_horizon`` H is ours
    (f_t = max(0, 1 − t/H); unset: f_t = 1, TRL's α_t).
    """

    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0
    bias_horizon: float | None = None

    def beta(self, t: int) -> float:
        """β_t, the EMA step size at step t."""
        return ema_step_size(t, self.lag, self.multiplier, self.ema_power, self.min_ema_multiplier)

    def alpha(self, t: int) -> float:
        """α_t, the bias-correction weight at step t."""
        return bias_correction(t, self.lag, self.multiplier, self.bias_power, self.bias_horizon)


@dataclass(frozen=True)
class EMADecay:
    """d_n = ``decay``, or with ``use_ema_warmup`` diffusers' min(decay, 1 − (1 + n/inv_gamma)^(−power))."""

    decay: float = 0.999
    use_ema_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3

    def at(self, n: int) -> float:
        """d_n after n updates."""
        return warmup_decay(n, self.decay, self.inv_gamma, self.power) if self.use_ema_warmup else self.decay


def field_names(schedule: type) -> tuple[str, ...]:
    """The hyper-parameter names a schedule dataclass holds."""
    return tuple(f.name for f in fields(schedule))


def schedule_for(averager: type, schedule: type, values: dict[str, Any]) -> Any:
    """``schedule(**values)``, refusing a value that ``averager`` does not declare in ``hyperparameters``."""
    unknown = sorted(set(values) - set(averager.hyperparameters))
    if unknown:
        raise TypeError(
            f"{averager.__name__}() got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"its hyper-parameters are: {', '.join(averager.hyperparameters)}"
        )
    return schedule(**values)
