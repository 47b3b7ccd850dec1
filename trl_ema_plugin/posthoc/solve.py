"""Post-hoc EMA weights: which combination of recorded power-function EMAs best matches another profile
(EDM2 Algorithm 3, ``power_function_correlation`` and ``solve_posthoc_coefficients``).

A recorded EMA i (time t_i, exponent γ_i) is ∫ f_i(τ) θ(τ) dτ with f_i(τ) = (γ_i+1) τ^γ_i / t_i^(γ_i+1) on
[0, t_i]. The profile inner product ⟨f_a, f_b⟩ = ∫ f_a f_b dτ is

    p(a, b) = (γ_a+1)(γ_b+1) (t_a/t_b)^e / ((γ_a+γ_b+1) max(t_a, t_b)),   e = γ_b if t_a < t_b else −γ_a.

The target r (t_r, γ_r) is approximated by h = Σ_i x_i f_i in L2: A x = b, A_ij = p(i, j), b_i = p(i, r),
solved in float64, then θ̂_r = Σ_i x_i θ̂_i. We solve by least squares (minimum norm; EDM2 and ema-pytorch call
``linalg.solve``): A is a Gram matrix, singular when two inputs share (t, γ) and ill-conditioned with many
close snapshots, where ``lstsq`` drops the null directions instead of returning huge cancelling x.

**Normalisation** (as EDM2): x ← x / Σx. Every profile integrates to 1, so Σx is the mass of h, and the
least-squares x has Σx ≠ 1 whenever h does not fit g exactly. Without normalising, the result is
Σx · (an average), pulled towards the origin of weight space: the weights at the start of training for
LoRA's B (which starts at 0) but an arbitrary point for A (Kaiming init) and for full fine-tuning, where a
mass of 0.98 moves a weight by 2% of its norm, far more than averaging does. Normalised, x are affine
weights: a constant trajectory (a tensor that never trains) is reproduced exactly, and shifting every
weight by c shifts the result by c. ``mass`` (Σx before normalising) and ``residual`` are kept as
diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def profile_inner_product(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """p(a, b) = ⟨f_a, f_b⟩ (broadcasting, float64)."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
    return numerator / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


@dataclass(frozen=True)
class Coefficients:
    """x_i (normalised to Σx = 1), the mass Σx of the least-squares solution, and the relative L2 residual
    ‖Σ x_i f_i − f_r‖ / ‖f_r‖ of the normalised weights (0: the target profile is reproduced exactly)."""

    weights: tuple[float, ...]
    mass: float
    residual: float


def solve_coefficients(
    t_in: Sequence[float], gamma_in: Sequence[float], t_out: float, gamma_out: float
) -> Coefficients:
    """Weights x of the inputs (t_i, γ_i), t_i > 0, that synthesize the profile (t_out, γ_out)."""
    if len(t_in) != len(gamma_in) or not t_in:
        raise ValueError(f"need one γ per input time and at least one input, got {len(t_in)} times, {len(gamma_in)} γ")
    t = torch.tensor(t_in, dtype=torch.float64)
    gamma = torch.tensor(gamma_in, dtype=torch.float64)
    if not bool((t > 0).all()) or t_out <= 0:
        raise ValueError(f"profile times must be > 0 (steps since averaging started), got {list(t_in)} → {t_out}")
    t_r = torch.tensor([t_out], dtype=torch.float64)
    g_r = torch.tensor([gamma_out], dtype=torch.float64)
    gram = profile_inner_product(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    rhs = profile_inner_product(t[:, None], gamma[:, None], t_r[None, :], g_r[None, :])
    x = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution[:, 0]
    mass = float(x.sum())
    if not math.isfinite(mass) or abs(mass) < 1e-12:
        raise ValueError(f"the inputs cannot synthesize t={t_out}, γ={gamma_out} (Σx = {mass})")
    x = x / mass
    target_norm2 = float(profile_inner_product(t_r, g_r, t_r, g_r)[0])
    error2 = float(x @ gram @ x - 2 * x @ rhs[:, 0]) + target_norm2
    return Coefficients(tuple(x.tolist()), mass, math.sqrt(max(error2, 0.0) / target_norm2))
