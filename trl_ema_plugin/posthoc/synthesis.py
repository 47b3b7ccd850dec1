"""Synthesize an EMA of any length after training from a run's snapshots (EDM2 ``reconstruct_phema``).

θ̂_r = Σ_i x_i θ̂_i over every recorded EMA i (snapshot, profile) with 0 < t_i ≤ t_r, x from
:func:`~trl_ema_plugin.posthoc.solve.solve_coefficients`. As EDM2, the target step must be a snapshot step
(the weights between snapshots are not recorded). The sum runs one parameter at a time in float64 over
memory-mapped files, so memory stays at one parameter per input, and the result is fp32.

Post-hoc BEMA: θ̂_r + α (θ_T − θ_0), with θ_T the live weights of the target snapshot and θ_0 those at the start
of averaging (``theta0.safetensors``).
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import Tensor

from ..averagers.power import check_sigma_rel, sigma_rel_to_gamma
from .snapshots import THETA, Profile, Snapshot, list_snapshots, read_theta0, resolve_posthoc_folder
from .solve import solve_coefficients


@dataclass(frozen=True)
class SynthesisInput:
    """One recorded EMA (a profile of a snapshot) and its weight x_i."""

    snapshot: Snapshot
    profile: Profile
    weight: float


@dataclass(frozen=True)
class SynthesisPlan:
    """What :func:`synthesize` combines: the target (σ_rel, γ, step, t) and each input's weight x_i, with the
    mass Σx before normalising and the relative L2 residual of the profile fit (see :mod:`.solve`)."""

    sigma_rel: float
    gamma: float
    target: Snapshot
    inputs: tuple[SynthesisInput, ...]
    mass: float
    residual: float

    @property
    def weight_l1(self) -> float:
        """Σ|x_i|: how much the rounding of the stored snapshots (their dtype) is amplified."""
        return sum(abs(i.weight) for i in self.inputs)


def plan_synthesis(folder: str | os.PathLike[str], sigma_rel: float, step: int | None = None) -> SynthesisPlan:
    """The inputs and weights that synthesize the EMA of ``sigma_rel`` at snapshot ``step`` (default: the last)."""
    sigma_rel = check_sigma_rel(sigma_rel)
    snapshots = list_snapshots(folder)
    if not snapshots:
        raise FileNotFoundError(f"{resolve_posthoc_folder(folder)} holds no snapshot-<step>.safetensors")
    target = _target(snapshots, step, folder)
    if target.t == 0:
        raise ValueError(
            f"step={target.global_step}: the EMAs were not updated yet (averaging started at step "
            f"{target.started_at}), so there is nothing to synthesize"
        )
    inputs: dict[tuple[int, float], tuple[Snapshot, Profile]] = {}
    for snapshot in snapshots:
        if 0 < snapshot.t <= target.t:
            for profile in snapshot.profiles:
                inputs.setdefault((snapshot.t, profile.gamma), (snapshot, profile))  # same (t, γ): same EMA
    if len(inputs) < 2:
        raise ValueError(
            f"{resolve_posthoc_folder(folder)} holds {len(inputs)} recorded EMA up to step {target.global_step}; "
            "synthesis needs at least 2 (several σ_rel, or several snapshots)"
        )
    gamma = sigma_rel_to_gamma(sigma_rel)
    times, gammas = zip(*inputs, strict=True)
    coefficients = solve_coefficients(times, gammas, target.t, gamma)
    chosen = tuple(
        SynthesisInput(snapshot, profile, x)
        for (snapshot, profile), x in zip(inputs.values(), coefficients.weights, strict=True)
    )
    return SynthesisPlan(sigma_rel, gamma, target, chosen, coefficients.mass, coefficients.residual)


def _target(snapshots: list[Snapshot], step: int | None, folder: str | os.PathLike[str]) -> Snapshot:
    if step is None:
        return snapshots[-1]
    for snapshot in snapshots:
        if snapshot.global_step == step:
            return snapshot
    steps = ", ".join(str(s.global_step) for s in snapshots)
    raise ValueError(
        f"step={step!r} is not a snapshot step of {resolve_posthoc_folder(folder)}; allowed values: {steps}"
    )


def synthesize(folder: str | os.PathLike[str], sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The EMA of ``sigma_rel`` at snapshot ``step`` (default: the last), fp32 tensors by parameter name."""
    return combine(plan_synthesis(folder, sigma_rel, step))


def combine(plan: SynthesisPlan, extra: tuple[tuple[str | os.PathLike[str], float], ...] = ()) -> dict[str, Tensor]:
    """Σ_i x_i θ̂_i (+ Σ c · θ from each ``(file, c)`` in ``extra``), per parameter in float64, returned in fp32."""
    terms = [(i.snapshot.path, i.profile.name, i.weight) for i in plan.inputs]
    terms += [(path, THETA, c) for path, c in extra]
    out: dict[str, Tensor] = {}
    with ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="pt")) for path, _, _ in terms}
        for name in plan.target.parameters:
            total = torch.zeros(plan.target.parameters[name], dtype=torch.float64)
            for path, buffer, weight in terms:
                total.add_(handles[path].get_tensor(f"{buffer}/{name}").to(torch.float64), alpha=weight)
            out[name] = total.to(torch.float32)
    return out


def synthesize_bema(
    folder: str | os.PathLike[str], sigma_rel: float, alpha: float, step: int | None = None
) -> dict[str, Tensor]:
    """Post-hoc BEMA: the synthesized EMA + α (θ_T − θ_0), θ_T the live weights at snapshot ``step``."""
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"alpha={alpha!r} is out of range; allowed values: 0 ≤ alpha ≤ 1 (BEMA's α_t)")
    plan = plan_synthesis(folder, sigma_rel, step)
    if not plan.target.has_theta:
        raise ValueError(
            f"{plan.target.path} holds no live weights θ (written without theta); post-hoc BEMA needs them"
        )
    theta0 = read_theta0(folder)
    if theta0.started_at != plan.target.started_at or theta0.parameters != plan.target.parameters:
        raise ValueError(
            f"{theta0.path} does not belong to the run of {plan.target.path} (start step or parameters differ)"
        )
    return combine(plan, ((plan.target.path, float(alpha)), (theta0.path, -float(alpha))))
