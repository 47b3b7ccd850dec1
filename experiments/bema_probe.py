"""Issue 11: can *any* BEMA setting beat the raw weights in the middle of a long run? A probe around θ_t.

BEMA outputs θ̂_t = EMA_t + α_t (θ_t − θ_0). For a short EMA, EMA_t − θ_t points back along the recent drift
θ_t − θ_{t−k}, so every BEMA output near θ_t lies close to the plane

    θ(a, b) = θ_t + a (θ_t − θ_0) + b (θ_t − θ_{t−k}),   k = :data:`RECENT` steps,

with a ≈ α_t (the look-ahead along the whole run) and b < 0 (the EMA's lag; b > 0 a look-ahead along the recent
drift). The probe evaluates the eval loss at the points :data:`POINTS` of that plane, on the replication's recorded
runs (fresh seeds 10-14, 64 eval functions, :mod:`experiments.offline`'s evaluator), at 20 % and 50 % of the
240-step runs, where no BEMA setting beat the raw weights, and at 50 % of the 60-step runs, where most did (the
probe's check that it finds a gain where one exists). Fixed before any of its results was seen.

If θ_t is lower than every probe point, on every seed, then no averager of this form gains there by a small step,
and the large steps (every BEMA setting of the study) were measured worse already::

    nice -n 19 python -m experiments.bema_probe run      # resumable; results in <data>/results/*-probe.json
    python -m experiments.bema_probe report              # the table, printed as markdown
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .bema_sweep import DEFAULT_DATA
from .cli import run_or_report
from .deltas import delta_cell
from .offline import RAW, ResultCache, eval_model
from .trajectory import RecordedRun, Trajectory, run_folder

RECENT = 10  # k: the recent drift θ_t − θ_{t−k}
#: (a, b): a along θ_t − θ_0 (BEMA's α), b along θ_t − θ_{t−k} (b < 0: behind, as an EMA; b > 0: ahead)
POINTS: tuple[tuple[float, float], ...] = ((-0.1, 0.0), (-0.03, 0.0), (0.03, 0.0), (0.1, 0.0), (0.0, -0.3), (0.0, 0.3))
N_EVAL = 64
#: (recorded run, steps probed): 20 % and 50 % of the fresh seeds' 240-step runs, 50 % of their 60-step runs
PROBED: tuple[tuple[RecordedRun, tuple[int, ...]], ...] = tuple(
    (RecordedRun(seed, steps), probed)
    for steps, probed in ((240, (48, 120)), (60, (30,)))
    for seed in (10, 11, 12, 13, 14)
)


def point_name(a: float, b: float) -> str:
    return f"a{a:+g}_b{b:+g}"


def probe_point(trajectory: Trajectory, step: int, a: float, b: float, recent: int = RECENT) -> dict[str, torch.Tensor]:
    """θ_t + a (θ_t − θ_0) + b (θ_t − θ_{t−k}), tensor by tensor, in fp32 (k = ``recent``)."""
    now, start, before = trajectory.theta(step), trajectory.theta(0), trajectory.theta(step - recent)
    return {n: now[n] + a * (now[n] - start[n]) + b * (now[n] - before[n]) for n in now}


def open_probe_cache(data: Path, run: RecordedRun, n_eval: int) -> ResultCache:
    context = {"run": run.run_id, "n_eval": n_eval, "eval_seed": run.seed, "probe_recent": RECENT}
    return ResultCache(data / "results" / f"{run.run_id}-eval{n_eval}-probe.json", context)


def run_probe(data: Path, probed_runs: Sequence[tuple[RecordedRun, tuple[int, ...]]] = PROBED, n_eval: int = N_EVAL):
    """Evaluate θ_t and every point of :data:`POINTS` at the probed steps that the cache lacks (resumable)."""
    for run, probed in probed_runs:
        cache = open_probe_cache(data, run, n_eval)
        todo = [(t, a, b) for t in probed for a, b in POINTS if cache.get(point_name(a, b), t) is None]
        todo += [(t, 0.0, 0.0) for t in probed if cache.get(RAW, t) is None]
        if not todo:
            continue
        trajectory = Trajectory(run_folder(data / "trajectories", run))
        _, loss = eval_model(run.scale, run.seed, n_eval)
        for t, a, b in todo:
            name = RAW if (a, b) == (0.0, 0.0) else point_name(a, b)
            cache.register(name, {"a": a, "b": b, "k": RECENT})
            cache.put(name, t, {**loss(probe_point(trajectory, t, a, b)), "step": t, "setting": name})
            print(f"{run.run_id} step {t} {name}: {cache.get(name, t)['loss']:.4f}", flush=True)


def report(
    data: Path, probed_runs: Sequence[tuple[RecordedRun, tuple[int, ...]]] = PROBED, n_eval: int = N_EVAL
) -> str:
    """Markdown: per run length and step, Δ = loss(point) − loss(θ_t), mean [min, max] over seeds, seeds below 0."""
    lines = ["| run length, step | " + " | ".join(f"a={a:+g}, b={b:+g}" for a, b in POINTS) + " |"]
    lines.append("|---" * (len(POINTS) + 1) + "|")
    lengths = sorted({run.steps for run, _ in probed_runs}, reverse=True)
    for steps in lengths:
        runs = [(run, probed) for run, probed in probed_runs if run.steps == steps]
        caches = [open_probe_cache(data, run, n_eval) for run, _ in runs]
        for t in runs[0][1]:
            cells = []
            for a, b in POINTS:
                deltas = [
                    c.get(point_name(a, b), t)["loss"] - c.get(RAW, t)["loss"]
                    for c in caches
                    if c.get(point_name(a, b), t) and c.get(RAW, t)
                ]
                if not deltas:
                    cells.append("not run")
                    continue
                cells.append(delta_cell(deltas, digits=4))
            lines.append(f"| T={steps}, step {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_or_report(
        argv, "Issue 11: the eval loss around θ_t in the plane of BEMA's outputs.", ("--data", DEFAULT_DATA),
        lambda args: run_probe(args.folder), report,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
