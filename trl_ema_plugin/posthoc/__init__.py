"""Post-hoc EMA (EDM2): record power-function EMAs as snapshots, synthesize any EMA length after training.

solve.py (profile inner products, the weights x), snapshots.py (file format, atomic writes, checked reading),
recorder.py (the EMAs and their snapshots during a run, or replayed from a recorded trajectory), synthesis.py
(θ̂_r = Σ x_i θ̂_i from a run's folder, post-hoc BEMA), model_files.py (synthesized tensors → adapter files),
sweep.py and evaluation.py (choose σ_rel on an eval set). The online averager is
:class:`trl_ema_plugin.averagers.power.PowerFunctionEMA` (``method="power_ema"``); the TRL callback is
:class:`trl_ema_plugin.PostHocEMACallback`.
"""

from ..averagers.power import PowerFunctionEMA, gamma_to_sigma_rel, sigma_rel_to_gamma
from .evaluation import TokenLoss, read_rows
from .model_files import load_into, write_model_files
from .recorder import PostHocRecorder, replay
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
from .sweep import SweepPoint, SweepResult, sweep
from .synthesis import SynthesisPlan, live_weights, plan_synthesis, synthesize, synthesize_bema

__all__ = [
    "POSTHOC_FOLDER",
    "Coefficients",
    "PostHocRecorder",
    "PowerFunctionEMA",
    "Profile",
    "Snapshot",
    "SweepPoint",
    "SweepResult",
    "SynthesisPlan",
    "TokenLoss",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "live_weights",
    "load_into",
    "plan_synthesis",
    "profile_inner_product",
    "read_rows",
    "read_snapshot",
    "read_theta0",
    "replay",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "sweep",
    "synthesize",
    "synthesize_bema",
    "write_model_files",
    "write_snapshot",
    "write_theta0",
]
