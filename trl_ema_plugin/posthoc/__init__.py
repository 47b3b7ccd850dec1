"""Post-hoc EMA (EDM2): record power-function EMAs as snapshots, synthesize any EMA length after training.

solve.py (profile inner products, the weights x), snapshots.py (file format, atomic writes, checked reading),
synthesis.py (θ̂_r = Σ x_i θ̂_i from a run's folder, post-hoc BEMA). The online averager is
:class:`trl_ema_plugin.averagers.power.PowerFunctionEMA`.
"""

from ..averagers.power import PowerFunctionEMA, gamma_to_sigma_rel, sigma_rel_to_gamma
from .snapshots import (
    POSTHOC_FOLDER,
    Profile,
    Snapshot,
    list_snapshots,
    read_snapshot,
    read_theta0,
    write_snapshot,
    write_theta0,
)
from .solve import Coefficients, profile_inner_product, solve_coefficients
from .synthesis import SynthesisPlan, plan_synthesis, synthesize, synthesize_bema

__all__ = [
    "POSTHOC_FOLDER",
    "Coefficients",
    "PowerFunctionEMA",
    "Profile",
    "Snapshot",
    "SynthesisPlan",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "plan_synthesis",
    "profile_inner_product",
    "read_snapshot",
    "read_theta0",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "synthesize",
    "synthesize_bema",
    "write_snapshot",
    "write_theta0",
]
