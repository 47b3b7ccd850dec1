"""Tables and plots of the issue-11 study (:mod:`experiments.bema_sweep`), from its cached results.

* ``tuning``: per setting, the mean over seeds of Δ = loss(setting) − loss(raw) at 20 %, 50 % and
  100 % of the 60- and 240-step runs, the worst seed at the end, the drift model's θ̂_T/θ_T, and
  the setting the protocol's rule (:func:`choose`) picks.
* ``replication`` / ``long``: per averager and eval step, mean ± std of the eval loss over seeds,
  Δ to the raw weights (mean, min, max, seeds below 0), and the per-seed signs of the chosen setting.

Generated markdown goes between markers in ``docs/evidence.md`` (and ``docs/bema_<stage>.md``);
plots to ``docs/evidence_bema_<stage>.png``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .deltas import delta_cell
from .offline import RAW, replay
from .trajectory import RecordedRun

#: settings that are references, not candidates of the choice
REFERENCES = ("raw", "ema_0.9", "ema_0.98", "dema", "ouema")
END_TOLERANCE = 0.005  # no seed's Δ at the end may exceed this
TIE = 0.003  # "within 0.003 of the best"
RUN_LENGTH_AWARE = ("_n20", "_n50", "_gT")


# ------------------------------------------------------------------------------ the drift model
class LinearDecayDrift:
    """θ_s = s − s²/(2T): a weight drifting at a speed ∝ the learning rate, decayed linearly to 0 at T."""

    def __init__(self, steps: int, decay: bool = True) -> None:
        self.steps, self.decay = steps, decay
        self.names = ["w"]
        self.run_id = f"drift-{steps}"

    def position(self, s: int) -> float:
        return s - s * s / (2 * self.steps) if self.decay else float(s)

    def theta(self, s: int) -> dict[str, torch.Tensor]:
        return {"w": torch.tensor([self.position(s)], dtype=torch.float64).float()}


def drift_ratio(
    settings: Mapping[str, Mapping[str, Any]], steps: int, at: list[int], decay: bool = True
) -> dict[str, dict[int, float]]:
    """θ̂_t/θ_t of each setting on :class:`LinearDecayDrift` (1: on θ_t; > 1: extrapolates past it; < 1: lags)."""
    drift = LinearDecayDrift(steps, decay)
    out: dict[str, dict[int, float]] = {name: {} for name in settings}
    for t, name, tensors in replay(drift, settings, {name: set(at) for name in settings}):
        out[name][t] = float(tensors["w"]) / drift.position(t)
    return out


# ------------------------------------------------------------------------------ loading
@dataclass
class StageResults:
    """``loss[(steps, seed)][setting][step]`` and each setting's spec per run length."""

    loss: dict[tuple[int, int], dict[str, dict[int, float]]]
    settings: dict[int, dict[str, dict[str, Any]]]

    @property
    def lengths(self) -> list[int]:
        return sorted({steps for steps, _ in self.loss})

    def seeds(self, steps: int) -> list[int]:
        return sorted(seed for s, seed in self.loss if s == steps)

    def value(self, steps: int, seed: int, name: str, step: int) -> float | None:
        curve = self.loss[(steps, seed)].get(name, {})
        return curve.get(step) if step > 0 else self.loss[(steps, seed)].get(RAW, {}).get(0)

    def delta(self, steps: int, seed: int, name: str, step: int) -> float | None:
        own, raw = self.value(steps, seed, name, step), self.value(steps, seed, RAW, step)
        return None if own is None or raw is None else own - raw


def load_stage(stage: Any, data: Path) -> StageResults:
    from .bema_sweep import open_cache, results_path

    loss: dict[tuple[int, int], dict[str, dict[int, float]]] = {}
    settings: dict[int, dict[str, dict[str, Any]]] = {}
    for run in stage.runs:
        if not results_path(data, run, stage.n_eval).is_file():
            continue
        cache = open_cache(data, run, stage.n_eval)
        curves: dict[str, dict[int, float]] = {}
        for result in cache.results.values():
            curves.setdefault(result["setting"], {})[int(result["step"])] = float(result["loss"])
        loss[(run.steps, run.seed)] = curves
        settings.setdefault(run.steps, {}).update(cache.settings)
    return StageResults(loss, settings)


def complete(results: StageResults, stage: Any, run: RecordedRun) -> bool:
    curves = results.loss.get((run.steps, run.seed))
    if curves is None:
        return False
    wanted = stage.settings(run.steps)
    return all(t in curves.get(n, {}) for n in wanted for t in stage.eval_steps(run.steps) if t > 0)


# ------------------------------------------------------------------------------ tuning
def _mean(values: list[float | None]) -> float:
    """The mean of the values that exist (a run not evaluated yet is None), else nan."""
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else float("nan")


def tuning_rows(results: StageResults, stage: Any) -> list[dict[str, Any]]:
    """One row per setting: mean Δ at each fraction and length, worst seed at the end, eligibility."""
    names = list(stage.settings(results.lengths[0]))
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "reference": name in REFERENCES or name == "bema_trl"}
        during, eligible = [], name not in REFERENCES
        for steps in results.lengths:
            points = [t for t in stage.eval_steps(steps) if t > 0]
            for t in points:
                deltas = [results.delta(steps, seed, name, t) for seed in results.seeds(steps)]
                deltas = [d for d in deltas if d is not None]
                row[(steps, t)] = _mean(deltas)
                if t == steps:
                    row[(steps, "worst_end")] = max(deltas) if deltas else float("nan")
                    eligible &= bool(deltas) and _mean(deltas) <= 0 and max(deltas) <= END_TOLERANCE
                else:
                    during.append(_mean(deltas))
            mid = _mean([row[(steps, t)] for t in points if t != steps])
            row[(steps, "during")] = mid
            eligible &= mid < 0
        row["during"] = _mean(during)
        row["eligible"] = eligible
        row["end"] = _mean([row[(steps, steps)] for steps in results.lengths])
        rows.append(row)
    return rows


def _changes(spec: Mapping[str, Any]) -> int:
    """How many settings differ from TRL's BEMA with update_every=1."""
    defaults = {"method": "bema", "update_every": 1}
    return sum(1 for k, v in spec.items() if defaults.get(k) != v) + sum(1 for k in defaults if k not in spec)


def choose(rows: list[dict[str, Any]], settings: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, str]:
    """The protocol's choice among the BEMA settings, and why."""
    eligible = [r for r in rows if r["eligible"]]
    if not eligible:
        fallback = [r for r in rows if r["name"] not in REFERENCES and r["during"] < 0]
        if not fallback:
            return None, "no BEMA setting was better than the raw weights during the run"
        best = min(fallback, key=lambda r: r["end"])
        return best["name"], "no setting met the bar; best mean Δ at the end among those better during the run"
    best = min(r["during"] for r in eligible)
    near = [r for r in eligible if r["during"] <= best + TIE]
    near.sort(key=lambda r: (any(m in r["name"] for m in RUN_LENGTH_AWARE), _changes(settings[r["name"]]), r["end"]))
    return near[0]["name"], (
        f"eligible: {', '.join(r['name'] for r in eligible)}; within {TIE} of the best mean Δ during the run "
        f"({best:+.4f}): {', '.join(r['name'] for r in near)}"
    )


def _f(value: float, digits: int = 3) -> str:
    return "—" if value != value else f"{value:+.{digits}f}"


def tuning_markdown(results: StageResults, stage: Any) -> tuple[str, str | None]:
    rows = tuning_rows(results, stage)
    lengths = results.lengths
    settings = results.settings[lengths[-1]]
    chosen, why = choose(rows, settings)
    ratios = {steps: drift_ratio(stage.settings(steps), steps, [steps]) for steps in lengths}
    raw_end = {
        steps: _mean([results.value(steps, seed, RAW, steps) for seed in results.seeds(steps)]) for steps in lengths
    }
    header = ["setting"]
    for steps in lengths:
        points = [t for t in stage.eval_steps(steps) if t > 0]
        header += [f"T={steps}: Δ@{t}" for t in points] + [f"T={steps}: worst seed @end", f"T={steps}: θ̂/θ drift"]
    header += ["mean Δ during (20 %, 50 %)", "eligible"]
    lines = [
        f"Runs: {', '.join(f'T={s}: seeds {results.seeds(s)}' for s in lengths)}; "
        f"{stage.n_eval} eval functions per seed. Δ = eval loss − raw eval loss (same run and step), mean over seeds; "
        "negative is better. Raw eval loss at the end (mean): "
        + ", ".join(f"T={s}: {raw_end[s]:.4f}" for s in lengths)
        + ". θ̂/θ drift: the setting's output over θ_T for a weight drifting at a speed ∝ the linearly "
        "decayed learning rate (1: on θ_T, > 1: past it).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in sorted(rows, key=lambda r: (r["name"] != RAW, r["name"] not in REFERENCES, r["during"])):
        if row["name"] == RAW:
            continue
        cells = [f"`{row['name']}`" + (" **(chosen)**" if row["name"] == chosen else "")]
        for steps in lengths:
            points = [t for t in stage.eval_steps(steps) if t > 0]
            cells += [_f(row[(steps, t)]) for t in points]
            cells += [_f(row[(steps, "worst_end")]), f"{ratios[steps][row['name']][steps]:.3f}"]
        cells += [_f(row["during"], 4), "yes" if row["eligible"] else ("ref." if row["name"] in REFERENCES else "no")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Chosen by the protocol's rule: **`{chosen}`** = `{settings.get(chosen)}`. {why}."]
    return "\n".join(lines), chosen


# ------------------------------------------------------------------------------ replication
def replication_markdown(results: StageResults, stage: Any, highlight: str) -> str:
    lines: list[str] = []
    for steps in results.lengths:
        seeds = results.seeds(steps)
        points = stage.eval_steps(steps)
        names = list(stage.settings(steps))
        lines += [
            f"**{steps}-step runs**, seeds {seeds}, {stage.n_eval} eval functions per seed. Eval loss, mean ± std over seeds:",
            "",
            "| averager | " + " | ".join(str(t) for t in points) + " |",
            "|---|" + "---|" * len(points),
        ]
        for name in names:
            cells = []
            for t in points:
                values = [v for v in (results.value(steps, s, name, t) for s in seeds) if v is not None]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{_mean(values):.4f} ± {spread:.4f}" if values else "—")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Difference to the raw weights (same seed and step): mean [min, max] over seeds, and how many seeds are below 0:",
            "",
            "| averager | " + " | ".join(str(t) for t in points if t > 0) + " |",
            "|---|" + "---|" * len([t for t in points if t > 0]),
        ]
        for name in names:
            if name == RAW:
                continue
            cells = []
            for t in points:
                if t == 0:
                    continue
                deltas = [d for d in (results.delta(steps, s, name, t) for s in seeds) if d is not None]
                if not deltas:
                    cells.append("—")
                    continue
                cells.append(delta_cell(deltas))
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        if highlight in names:
            lines += [
                "",
                f"Per seed, sign of `{highlight}` − raw (− better, + worse), during the run and at the end:",
                "",
            ]
            for seed in seeds:
                signs = []
                for t in points[1:]:
                    d = results.delta(steps, seed, highlight, t)
                    signs.append("·" if d is None else ("−" if d < 0 else "+"))
                end = results.delta(steps, seed, highlight, steps)
                lines.append(f"- seed {seed}: {' '.join(signs)} (end: {_f(end, 4) if end is not None else '—'})")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def plot_tuning(results: StageResults, stage: Any, chosen: str | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = tuning_rows(results, stage)
    fig, axes = plt.subplots(1, len(results.lengths), figsize=(6.5 * len(results.lengths), 5.5), squeeze=False)
    for ax, steps in zip(axes[0], results.lengths, strict=True):
        for row in rows:
            x, y = row[(steps, "during")], row[(steps, steps)]
            ref = row["name"] in REFERENCES or row["name"] == "bema_trl"
            color = "red" if row["name"] == chosen else ("black" if ref else "tab:blue")
            ax.scatter([x], [y], color=color, s=18)
            ax.annotate(row["name"], (x, y), fontsize=6, color=color, xytext=(2, 2), textcoords="offset points")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set(
            xlabel="mean Δ at 20 % and 50 % of the run (< 0: better during the run)",
            ylabel="mean Δ at the end (< 0: better at the end)",
            title=f"{steps}-step runs, seeds {results.seeds(steps)}: Δ = loss − raw loss",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_replication(results: StageResults, stage: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    lengths = results.lengths
    fig, axes = plt.subplots(2, len(lengths), figsize=(6.5 * len(lengths), 9), squeeze=False)
    for column, steps in enumerate(lengths):
        seeds, points = results.seeds(steps), stage.eval_steps(steps)
        for name in stage.settings(steps):
            style = {"color": "black", "linewidth": 2} if name == RAW else {}
            for row, fn in ((0, results.value), (1, results.delta)):
                xs, mean, lo, hi = [], [], [], []
                for t in points:
                    values = [v for v in (fn(steps, s, name, t) for s in seeds) if v is not None]
                    if len(values) == len(seeds):
                        xs.append(t)
                        mean.append(_mean(values))
                        lo.append(min(values))
                        hi.append(max(values))
                ax = axes[row][column]
                (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=name, **style)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        axes[0][column].set(
            xlabel="optimizer step", ylabel="held-out eval loss", title=f"{steps}-step runs: mean of seeds {seeds}"
        )
        axes[1][column].set(
            xlabel="optimizer step", ylabel="eval loss − raw (same seed)", title="difference to raw (band: min–max)"
        )
        axes[1][column].axhline(0, color="grey", linewidth=0.8)
        axes[1][column].set_ylim(-0.2, 0.25)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ writing
def marker(stage: str) -> tuple[str, str]:
    return (
        f"<!-- bema-study {stage}: generated by `python -m experiments.bema_sweep report --stage {stage}`, do not edit -->",
        f"<!-- end bema-study {stage} -->",
    )


def fill_block(page: Path, stage: str, body: str) -> bool:
    begin, end = marker(stage)
    text = page.read_text() if page.is_file() else ""
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    page.write_text(f"{head}{begin}\n{body.rstrip()}\n{end}{rest.split(end, 1)[1]}")
    return True


def write_stage_report(stage: Any, data: Path, docs: Path) -> list[Path]:
    """The stage's table (``docs/bema_<stage>.md`` and its block in ``docs/evidence.md``), then its plot.

    Without matplotlib (the Axolotl stack installs no ``[experiments]`` extra) the tables are written and an
    ImportError says how to get the plot.
    """
    from .bema_sweep import CHOSEN_NAME
    from .report import use_agg_backend

    results = load_stage(stage, data)
    if not results.loss:
        raise FileNotFoundError(f"no results of stage {stage.name!r} under {data}; run it first")
    docs.mkdir(parents=True, exist_ok=True)
    unfinished = [r.run_id for r in stage.runs if not complete(results, stage, r)]
    note = f"\n\nNot finished yet: {', '.join(unfinished)}." if unfinished else ""
    if stage.name == "tuning":
        body, chosen = tuning_markdown(results, stage)
    else:
        body, chosen = replication_markdown(results, stage, CHOSEN_NAME), None
    body += note
    table = docs / f"bema_{stage.name}.md"
    table.write_text(f"# BEMA study, {stage.name} stage (generated)\n\n{body}\n")
    written = [table]
    if fill_block(docs / "evidence.md", stage.name, body):
        written.append(docs / "evidence.md")
    use_agg_backend(table)
    plot = docs / f"evidence_bema_{stage.name}.png"
    if stage.name == "tuning":
        plot_tuning(results, stage, chosen, plot)
    else:
        plot_replication(results, stage, plot)
    return [*written, plot]
