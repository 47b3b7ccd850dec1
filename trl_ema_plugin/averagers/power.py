"""Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2; github NVlabs/edm2 ``training/phema.py``), the online half of post-hoc EMA.

Notation of EDM2. The power-function EMA with exponent γ ≥ 0 averages the weights θ_τ, 0 < τ ≤ t, with
the profile f_{t,γ}(τ) = (γ+1)·τ^γ / t^(γ+1), which integrates to 1. Its width relative to t is

    σ_rel(γ) = sqrt((γ+1) / ((γ+2)² (γ+3)))                         (EDM2 Eq. 123, ``exp_to_std``)

and γ(σ_rel) is the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0
(Eq. 126, Algorithm 2, ``std_to_exp``). σ_rel decreases from 1/√12 ≈ 0.2887 at γ = 0 (the uniform
average of the run) to 0 as γ → ∞; EDM2 trains with σ_rel 0.05 (γ ≈ 16.97) and 0.10 (γ ≈ 6.94).

**Time.** t counts optimizer steps since averaging started (t = global_step − τ, τ = ``update_after``).
EDM2 counts images (t_delta = batch size); with a constant batch size the two clocks differ by a constant
factor c, β_t below is unchanged, and the synthesis weights are too (each profile inner product scales
by 1/c). With a varying batch (packing) we still count steps: a step is one change of the weights.
"""

from __future__ import annotations

import math

import torch

from .base import Averager
from .ops import Tensors, copy_, lerp_

#: σ_rel of γ = 0, the uniform average over the whole run: the largest σ_rel with γ ≥ 0
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel(γ) = sqrt((γ+1) / ((γ+2)² (γ+3))), for γ ≥ 0."""
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma={gamma!r} is not a power-function EMA exponent; allowed values: a finite gamma ≥ 0")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def check_sigma_rel(sigma_rel: float, key: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or a ``ValueError`` naming ``key``, the value and the allowed range."""
    try:
        value = float(sigma_rel)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= SIGMA_REL_MAX):
        raise ValueError(
            f"{key}={sigma_rel!r} is out of range; allowed values: 0 < {key} ≤ {SIGMA_REL_MAX:.4f} (1/√12, the "
            f"uniform average of the run; smaller is a shorter average, EDM2 keeps 0.05 and 0.10)"
        )
    return value


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ(σ_rel): the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0.

    For 0 < σ_rel ≤ 1/√12 the cubic has three real roots, one < −3, one in (−1, 0] and the largest ≥ 0,
    the exponent of the profile. Roots as EDM2's ``np.roots``: eigenvalues of the companion matrix, in
    float64, then one Newton step.
    """
    s = check_sigma_rel(sigma_rel) ** -2
    coefficients = [7.0, 16.0 - s, 12.0 - s]  # monic: γ³ + c2 γ² + c1 γ + c0
    companion = torch.zeros(3, 3, dtype=torch.float64)
    companion[0] = -torch.tensor(coefficients, dtype=torch.float64)
    companion[1, 0] = companion[2, 1] = 1.0
    roots = torch.linalg.eigvals(companion)
    gamma = float(roots.real.max())
    cubic = ((gamma + coefficients[0]) * gamma + coefficients[1]) * gamma + coefficients[2]
    slope = (3 * gamma + 2 * coefficients[0]) * gamma + coefficients[1]
    gamma -= cubic / slope if slope else 0.0
    return max(gamma, 0.0)


def power_function_beta(gamma: float, t: int, t_delta: int = 1) -> float:
    """β_t = (1 − t_delta/t)^(γ+1) (EDM2 Eq. 127, ``power_function_beta``): θ̂_t = β_t θ̂_{t−Δ} + (1 − β_t) θ_t.

    ``t``: steps since averaging started, ``t_delta``: steps since the previous update (1 when every step
    updates). β = 0 at the first update (t = t_delta): the starting weights get no weight, as in EDM2.
    """
    if not 0 < t_delta <= t:
        raise ValueError(f"power-function EMA needs 0 < t_delta ≤ t, got t={t}, t_delta={t_delta}")
    return (1.0 - t_delta / t) ** (gamma + 1.0)


class PowerFunctionEMA(Averager):
    r"""θ̂_t = β_t · θ̂_{t−Δ} + (1 − β_t) · θ_t,   β_t = (1 − Δ/t)^(γ+1),   γ = γ(σ_rel)

    t = steps since averaging started (``update_after``), Δ = steps since the previous update. Unrolled,
    θ̂_t = Σ_j w_j θ_{u_j} over the update steps u_1 < … < u_n = t, with exactly
    w_j = (u_j^(γ+1) − u_{j−1}^(γ+1)) / t^(γ+1) (u_0 = 0): the integral of EDM2's profile
    (γ+1) τ^γ / t^(γ+1) over (u_{j−1}, u_j], i.e. weights ∝ τ^γ. The weights at the start (θ at
    ``update_after``) are the output only until the first update, which gives them weight 0.

    Not registered as a method (the post-hoc recorder builds these directly); ``method`` is a label.
    Memory: one fp32 copy of the tracked weights.
    """

    method = "power_ema"
    buffer_names = ("ema",)
    hyperparameters = ("sigma_rel",)
    flat_math = True

    def __init__(self, sigma_rel: float = 0.05) -> None:
        super().__init__()
        self.sigma_rel = check_sigma_rel(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)

    @property
    def profile_time(self) -> int:
        """t of the current profile: steps from the start of averaging to the last update (0 before one)."""
        if self.started_at is None or self.last_update_step is None:
            raise RuntimeError("PowerFunctionEMA.profile_time read before start()")
        return self.last_update_step - self.started_at

    def beta(self, t: int) -> float:
        assert self.started_at is not None and self.last_update_step is not None
        return power_function_beta(self.gamma, t - self.started_at, t - self.last_update_step)

    def _start(self, theta: Tensors, t: int) -> None:
        copy_(self.state("ema", theta), theta)

    def _update(self, theta: Tensors, t: int) -> None:
        # called before the base class sets last_update_step = t, so Δ = t − previous update
        lerp_(self.state("ema", theta), theta, 1.0 - self.beta(t))

    def output_reads_theta(self) -> bool:
        return False

    def average_into(self, out: Tensors, theta: Tensors | None, t: int) -> None:
        copy_(out, self.state("ema", out))
