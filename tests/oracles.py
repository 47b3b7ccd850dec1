"""Hand computations of every averager from a recorded trajectory of weights: the tests' one oracle.

Written from the formulas in the README (the paper's notation), independently of
``trl_ema_plugin.averagers``. A trajectory maps the optimizer step t to the weights θ_t, a dict
name → tensor or a list of tensors (the result has the same form). It needs θ at τ and at every
update step up to T; other steps may be missing.

Every oracle takes the settings of an averager under the package's names and defaults:

* cadence (``AveragerSpec``): averaging starts at τ = ``update_after`` (θ_0 = EMA_0 = θ_τ), then updates
  at every t > τ with (t − τ) % ``update_every`` == 0; the output at T = ``at`` (default: the last
  recorded step) uses the updates t ≤ T;
* its hyper-parameters (:class:`Decay` for EMA, :class:`Schedule` for BEMA, DEMA, OUEMA, ``sigma_rel`` for the
  power-function EMA); an unknown name is an error;
* ``resume``: continue from the state saved at step s (τ or an update step), ``{"step": s, <buffer>:
  weights}`` with the buffer names of ``averager_state.safetensors`` (``theta0``, ``ema``, ``ema_of_ema``);
* ``dtype``: float64 by default; ``torch.float32`` replays the averagers' own order of operations
  (EMA ← lerp(EMA, θ_t, β_t), then (θ − θ_0)·α + EMA), so that a test may compare bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor

Weights: TypeAlias = Mapping[str, Tensor] | Sequence[Tensor]
Trajectory: TypeAlias = Mapping[int, Weights]
State: TypeAlias = dict[Any, Tensor]


@dataclass(frozen=True)
class Decay:
    """EMA's decay d_n at the n-th update (n = 1 first): ``decay``, or with ``use_ema_warmup`` diffusers'
    warm-up d_n = min(d, 1 − (1 + n/inv_gamma)^−power)."""

    decay: float = 0.999
    use_ema_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3

    def at(self, n: int) -> float:
        if not self.use_ema_warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + n / self.inv_gamma) ** -self.power)


@dataclass(frozen=True)
class Schedule:
    """β_t = max((ρ + γ·t)^−κ, β_min) and α_t = (ρ + γ·t)^−η · max(0, 1 − t/H), t the absolute step,
    ρ + γ·t clamped at 1 (ρ = lag, γ = multiplier, κ = ema_power, η = bias_power, β_min = min_ema_multiplier,
    H = bias_horizon; without H the last factor is 1)."""

    lag: float = 10.0
    multiplier: float = 1.0
    ema_power: float = 0.5
    bias_power: float = 0.2
    min_ema_multiplier: float = 0.0
    bias_horizon: float | None = None

    def base(self, t: int) -> float:
        return max(self.lag + self.multiplier * t, 1.0)

    def beta(self, t: int) -> float:
        return max(self.base(t) ** -self.ema_power, self.min_ema_multiplier)

    def alpha(self, t: int) -> float:
        fade = 1.0 if self.bias_horizon is None else max(0.0, 1.0 - t / self.bias_horizon)
        return self.base(t) ** -self.bias_power * fade


class _Run:
    """An oracle's cadence (start, update steps up to T), its starting state, and its other settings."""

    def __init__(self, trajectory: Trajectory, settings: dict[str, Any]) -> None:
        settings = dict(settings)
        update_after, update_every = settings.pop("update_after", 0), settings.pop("update_every", 1)
        at = settings.pop("at", None)
        self.at: int = max(trajectory) if at is None else at
        resume: Mapping[str, Any] = settings.pop("resume", None) or {"step": update_after}
        self.dtype: torch.dtype = settings.pop("dtype", torch.float64)
        self.trajectory, self.hyperparameters = trajectory, settings
        self.update_after = update_after
        self.first = resume["step"]
        if self.at < self.first:
            raise ValueError(f"the output at step {self.at} precedes the start of averaging (step {self.first})")

        def updates(first: int, last: int) -> list[int]:
            return [
                t for t in range(first + 1, last + 1) if t > update_after and (t - update_after) % update_every == 0
            ]

        self.updates = updates(self.first, self.at)
        self.updates_before = len(updates(update_after, self.first))  # the n of a resumed warm-up
        self.last_update = self.updates[-1] if self.updates else self.first
        self.saved = {k: self._state(v) for k, v in resume.items() if k != "step"}

    def _state(self, weights: Weights) -> State:
        items = weights.items() if isinstance(weights, Mapping) else enumerate(weights)
        return {k: v.detach().to(dtype=self.dtype, copy=True) for k, v in items}

    def theta(self, t: int) -> State:
        return self._state(self.trajectory[t])

    def initial(self, buffer: str) -> State:
        """A buffer at the start: θ_τ, or the saved buffer of a resumed run."""
        return self.saved[buffer] if buffer in self.saved else self.theta(self.first)

    def output(self, state: State) -> Weights:
        template = self.trajectory[self.at]
        return dict(state) if isinstance(template, Mapping) else [state[i] for i in range(len(template))]


def _lerp(a: State, b: State, weight: float) -> State:
    """a + weight·(b − a) = (1 − weight)·a + weight·b."""
    return {k: torch.lerp(a[k], b[k], weight) for k in a}


def ema(trajectory: Trajectory, **settings: Any) -> Weights:
    """EMA_n = d_n·EMA_{n−1} + (1 − d_n)·θ_t at the n-th update t (:class:`Decay`)."""
    run = _Run(trajectory, settings)
    decay, average = Decay(**run.hyperparameters), run.initial("ema")
    for n, t in enumerate(run.updates, start=run.updates_before + 1):
        average = _lerp(average, run.theta(t), 1.0 - decay.at(n))
    return run.output(average)


def bema(trajectory: Trajectory, **settings: Any) -> Weights:
    """θ̂_T = α_s·(θ_s − θ_0) + EMA_s, EMA_t = (1 − β_t)·EMA_{t−1} + β_t·θ_t (:class:`Schedule`).

    s is the last update step ≤ T (τ when none): between sparse updates the output keeps θ of the
    last update, not the live weights of T.
    """
    run = _Run(trajectory, settings)
    schedule, theta0, average = Schedule(**run.hyperparameters), run.initial("theta0"), run.initial("ema")
    for t in run.updates:
        average = _lerp(average, run.theta(t), schedule.beta(t))
    s = run.last_update
    alpha, theta_s = schedule.alpha(s), run.theta(s)
    return run.output({k: (theta_s[k] - theta0[k]) * alpha + average[k] for k in average})


def dema(trajectory: Trajectory, **settings: Any) -> Weights:
    """θ̂ = 2·EMA_t − EMA(EMA)_t, both EMAs with BEMA's β_t (:class:`Schedule`; η unused)."""
    run = _Run(trajectory, settings)
    schedule, first, second = Schedule(**run.hyperparameters), run.initial("ema"), run.initial("ema_of_ema")
    for t in run.updates:
        first = _lerp(first, run.theta(t), schedule.beta(t))
        second = _lerp(second, first, schedule.beta(t))
    return run.output({k: 2 * first[k] - second[k] for k in first})


def ouema(trajectory: Trajectory, **settings: Any) -> Weights:
    """θ̂ = EMA (β_t) of z_t = (θ_t − α_t·θ_0)/(1 − α_t), with z_t = θ_t where α_t = 1 (:class:`Schedule`)."""
    run = _Run(trajectory, settings)
    schedule, theta0, average = Schedule(**run.hyperparameters), run.initial("theta0"), run.initial("ema")
    for t in run.updates:
        alpha, theta = schedule.alpha(t), run.theta(t)
        z = theta if 1.0 - alpha < 1e-6 else {k: (theta[k] - alpha * theta0[k]) / (1.0 - alpha) for k in theta}
        average = _lerp(average, z, schedule.beta(t))
    return run.output(average)


def tr_dpo(
    trajectory: Trajectory, *, ref_model_sync_steps: int, ref_model_mixup_alpha: float, at: int | None = None
) -> Weights:
    """TR-DPO's reference (TRL's names): ref_0 = θ_0, ref ← α·θ_t + (1 − α)·ref every τ steps, in float64."""
    run = _Run(trajectory, {"update_every": ref_model_sync_steps, "at": at})
    reference, alpha = run.initial("ref"), ref_model_mixup_alpha
    for t in run.updates:
        theta = run.theta(t)
        reference = {k: alpha * theta[k] + (1 - alpha) * reference[k] for k in theta}
    return run.output(reference)


# ------------------------------------------------------------------ the power-function EMA and post-hoc EMA (EDM2)
def gamma_of(sigma_rel: float) -> float:
    """EDM2's exponent γ of a relative width σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0, by numpy."""
    s = sigma_rel**-2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def power_ema(trajectory: Trajectory, sigma_rel: float = 0.05, **settings: Any) -> Weights:
    """θ̂ ← β_t·θ̂ + (1 − β_t)·θ_t at each update t, β_t = (1 − Δ/(t − τ))^(γ+1), Δ = t − the previous update
    (τ = ``update_after``, θ̂ = θ_τ at the start), γ = :func:`gamma_of` (σ_rel)."""
    run = _Run(trajectory, settings)
    if run.hyperparameters:
        raise TypeError(f"power_ema takes sigma_rel, not {sorted(run.hyperparameters)}")
    gamma, average, last = gamma_of(sigma_rel), run.initial("ema"), run.first
    for t in run.updates:
        beta = (1.0 - (t - last) / (t - run.update_after)) ** (gamma + 1.0)
        average, last = _lerp(average, run.theta(t), 1.0 - beta), t
    return run.output(average)


def profile_product(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """⟨f_a, f_b⟩ = ∫_0^min(t_a,t_b) (g_a+1) τ^g_a / t_a^(g_a+1) · (g_b+1) τ^g_b / t_b^(g_b+1) dτ, integrated by hand."""
    m = min(t_a, t_b)
    return (g_a + 1) * (g_b + 1) * m ** (g_a + g_b + 1) / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))


def posthoc_weights(inputs: Sequence[tuple[float, float]], t_out: float, sigma_out: float) -> np.ndarray:
    """x with Σ x_i f_i closest to f_(t_out, σ_out) in L2, normalised to Σx = 1: ``np.linalg.solve`` of the Gram
    system of :func:`profile_product` in float64 (inputs: (t_i, σ_rel_i))."""
    gammas = [(t, gamma_of(s)) for t, s in inputs]
    gram = np.array([[profile_product(ta, ga, tb, gb) for tb, gb in gammas] for ta, ga in gammas])
    rhs = np.array([profile_product(ta, ga, t_out, gamma_of(sigma_out)) for ta, ga in gammas])
    x = np.linalg.solve(gram, rhs)
    return x / x.sum()


def exact_power_ema(trajectory64: np.ndarray, t: int, gamma: float, start: int = 0) -> np.ndarray:
    """EDM2's power-function EMA at t (steps after ``start``) of rows θ_j of ``trajectory64``, exactly: θ_j weighted
    by (j/t)^(γ+1) − ((j−1)/t)^(γ+1), the profile (γ+1) τ^γ / t^(γ+1) integrated over (j−1, j]."""
    j = np.arange(1, t + 1, dtype=np.float64)
    w = (j / t) ** (gamma + 1) - ((j - 1) / t) ** (gamma + 1)
    return w @ trajectory64[start + 1 : start + t + 1]


ORACLES: dict[str, Callable[..., Weights]] = {
    "ema": ema, "bema": bema, "dema": dema, "ouema": ouema, "power_ema": power_ema,
}  # fmt: skip


def averaged(trajectory: Trajectory, spec: Mapping[str, Any], **options: Any) -> Weights:
    """The oracle of ``spec["method"]``, given an averager spec as the callbacks take it (``name`` ignored)."""
    settings = {k: v for k, v in spec.items() if k not in ("method", "name")}
    return ORACLES[spec["method"]](trajectory, **settings, **options)
