"""Step-size schedules shared by the averagers.

Notation of the BEMA paper (arXiv 2508.00180), as TRL's ``BEMACallback`` computes it,
with t the absolute optimizer step (``global_step``), not t − τ:

    β_t = max((ρ + γ·t)^(−κ), β_min)     EMA step size   (κ = ema_power, β_min = min_ema_multiplier)
    α_t = (ρ + γ·t)^(−η)                 bias-correction (η = bias_power)

ρ = ``lag``, γ = ``multiplier``. The base ρ + γ·t is clamped at 1 so that β_t, α_t ≤ 1
(TRL would raise ``ZeroDivisionError`` at ρ + γ·t = 0).

The authors' own repository (github abblock/bema, ``src/core_online.py``) uses another
parametrization, γ·(1 + max(0, t − ρ))^(−κ); we follow the paper and TRL.
"""

from __future__ import annotations


def schedule_base(t: int, lag: float, multiplier: float) -> float:
    """ρ + γ·t, clamped at 1."""
    return max(lag + multiplier * t, 1.0)


def ema_step_size(t: int, lag: float, multiplier: float, ema_power: float, min_ema_multiplier: float) -> float:
    """β_t = max((ρ + γ·t)^(−κ), β_min)."""
    return max(schedule_base(t, lag, multiplier) ** (-ema_power), min_ema_multiplier)


def bias_correction(t: int, lag: float, multiplier: float, bias_power: float) -> float:
    """α_t = (ρ + γ·t)^(−η)."""
    return schedule_base(t, lag, multiplier) ** (-bias_power)


def warmup_decay(n: int, decay: float, inv_gamma: float, power: float) -> float:
    """Diffusers' EMA warm-up: d_n = min(d, 1 − (1 + n/inv_gamma)^(−power)), n = updates so far."""
    return min(decay, 1.0 - (1.0 + n / inv_gamma) ** (-power))
