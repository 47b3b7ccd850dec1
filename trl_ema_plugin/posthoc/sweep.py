"""Choose σ_rel after training: evaluate the synthesized EMA of each σ_rel of a grid, report every loss and the best.

``evaluate`` maps synthesized tensors (parameter name → fp32 tensor) to a loss, lower is better: for instance
:class:`~trl_ema_plugin.posthoc.evaluation.TokenLoss` (a model and an eval set), or the trainer's own evaluation::

    def evaluate(tensors):
        load_into(trainer.model, tensors)
        return trainer.evaluate()["eval_loss"]

    result = sweep("out", [0.02, 0.05, 0.08, 0.12, 0.2], evaluate)
    print(result.table()); result.best.sigma_rel

The raw weights θ_T (when the snapshots keep them) are evaluated too, as the baseline.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .synthesis import SynthesisPlan, combine, live_weights, plan_synthesis, synthesize_bema

#: a profile fit with a larger relative L2 residual is reported as unreliable
RESIDUAL_WARNING = 0.05

Evaluate = Callable[[Mapping[str, Tensor]], float]


def residual_warning(plan: SynthesisPlan) -> str | None:
    """A warning when the recorded profiles do not fit σ_rel well (residual above :data:`RESIDUAL_WARNING`)."""
    if plan.residual <= RESIDUAL_WARNING:
        return None
    return (
        f"sigma_rel={plan.sigma_rel} at step {plan.target.global_step}: the recorded EMAs fit its profile with a "
        f"relative residual of {plan.residual:.3f} (> {RESIDUAL_WARNING}), so the synthesized average only "
        "approximates it; record a σ_rel closer to it, or snapshot more often"
    )


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated candidate: a σ_rel and its synthesis plan, or (``sigma_rel`` None) the raw weights θ_T."""

    sigma_rel: float | None
    loss: float
    plan: SynthesisPlan | None = None

    @property
    def label(self) -> str:
        return "raw" if self.sigma_rel is None else f"{self.sigma_rel:g}"


@dataclass(frozen=True)
class SweepResult:
    """Every candidate's loss at snapshot ``step``; ``bema_alpha``: each is post-hoc BEMA with that α."""

    step: int
    points: tuple[SweepPoint, ...]
    raw: SweepPoint | None
    bema_alpha: float | None = None

    @property
    def best(self) -> SweepPoint:
        """The σ_rel of lowest loss (the raw weights are a baseline, not a candidate)."""
        return min(self.points, key=lambda p: p.loss)

    def table(self) -> str:
        """Tab-separated: σ_rel, loss, residual, Σx (before normalising), Σ|x|; the best marked."""
        kind = f"post-hoc BEMA, alpha={self.bema_alpha:g}" if self.bema_alpha else "post-hoc EMA"
        lines = [f"# step {self.step}, {kind}", "sigma_rel\tloss\tresidual\tsum_x\tsum_abs_x\t"]
        rows = [*self.points, *([self.raw] if self.raw is not None else [])]
        for point in rows:
            plan = point.plan
            diagnostics = (
                f"{plan.residual:.2e}\t{plan.mass:.4f}\t{plan.weight_l1:.3f}" if plan is not None else "-\t-\t-"
            )
            mark = "best" if point is self.best else ""
            lines.append(f"{point.label}\t{point.loss:.6f}\t{diagnostics}\t{mark}")
        return "\n".join(lines)


def sweep(
    run: str | os.PathLike[str],
    sigma_rels: Sequence[float],
    evaluate: Evaluate,
    step: int | None = None,
    bema_alpha: float | None = None,
    raw: bool = True,
) -> SweepResult:
    """Evaluate the EMA of each ``sigma_rels`` synthesized at snapshot ``step`` (default: the last) of ``run``
    (an ``output_dir`` or its ``posthoc/``); with ``bema_alpha``, post-hoc BEMA. ``raw``: evaluate θ_T as well,
    when the snapshot holds it. Warns (``UserWarning``) where a profile fits with a residual above 0.05."""
    if not sigma_rels:
        raise ValueError("sigma_rels is empty: give the σ_rel values to compare")
    points = []
    target = None
    for sigma_rel in sigma_rels:
        plan = plan_synthesis(run, sigma_rel, step)
        target = plan.target
        message = residual_warning(plan)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=2)
        bema = bema_alpha is not None and bema_alpha > 0
        tensors = synthesize_bema(run, sigma_rel, bema_alpha, target.global_step) if bema else combine(plan)
        points.append(SweepPoint(plan.sigma_rel, float(evaluate(tensors)), plan))
    assert target is not None
    baseline = None
    if raw and target.has_theta:
        baseline = SweepPoint(None, float(evaluate(live_weights(run, target.global_step))))
    return SweepResult(target.global_step, tuple(points), baseline, bema_alpha)
