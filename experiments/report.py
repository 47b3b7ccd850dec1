"""Plots (matplotlib PNG) and the results table (markdown) from the runs recorded in an output folder.

Table columns, per method:

* **final eval loss**: at the last step (mean over seeds, and each seed);
* **steps to vanilla's best**: the first eval step at which the method's eval loss is at or
  below the best eval loss that vanilla (raw weights / plain LoRA / fixed reference) reached
  anywhere in the same seed's run; "not reached" otherwise;
* **step-time ratio**: time per optimizer step relative to vanilla. For (a), where every averager
  rides the same run, it is ``(t_raw + t_update) / t_raw`` with ``t_update`` the measured seconds
  of that averager's update and ``t_raw`` the step time without any update; for (b) and (c) it is
  the ratio of median CPU seconds per step of the ``timing`` runs (one torch thread, so other jobs
  on the machine barely change it), or, without them, of median wall seconds of the study's runs.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from trl_ema_plugin.averagers.schedules import bias_correction, ema_step_size

VANILLA = {"sft": "raw", "lowdata": "plain", "dpo": "fixed_ref"}
#: table and legend order of the (b) and (c) runs (the plan's order); other labels follow
LABEL_ORDER = ["plain", "ema_teacher", "bema_teacher", "fixed_ref", "ema_ref", "bema_ref"]
DPO_ACCURACY = "accuracy_vs_initial"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def steps_to_reach(curve: list[list[float]], target: float, lower_is_better: bool = True) -> int | None:
    """First step of ``curve`` whose value is at or better than ``target``."""
    for step, value in curve:
        if (value <= target + 1e-12) if lower_is_better else (value >= target - 1e-12):
            return int(step)
    return None


def _best(curve: list[list[float]], lower_is_better: bool = True) -> float:
    values = [v for _, v in curve]
    return min(values) if lower_is_better else max(values)


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def _by_study(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rank = {label: i for i, label in enumerate(LABEL_ORDER)}
    for result in sorted(results, key=lambda r: (rank.get(r["label"], len(rank)), r["seed"])):
        grouped[result["study"]].append(result)
    return grouped


# ------------------------------------------------------------------------------ method curves
def method_curves(study: str, runs: list[dict[str, Any]]) -> dict[str, dict[int, list[list[float]]]]:
    """``{method: {seed: curve}}``: the primary eval curve of each method (loss; DPO: accuracy vs initial)."""
    curves: dict[str, dict[int, list[list[float]]]] = defaultdict(dict)
    for run in runs:
        if study == "sft":
            for name, curve in run["curves"].items():
                curves[name][run["seed"]] = curve
        elif study == "lowdata":
            curves[run["label"]][run["seed"]] = run["curves"]["raw"]
        else:
            curves[run["label"]][run["seed"]] = run["curves"][DPO_ACCURACY]
    return curves


def _update_ratio(run: dict[str, Any], name: str) -> float:
    if name == "raw":
        return 1.0
    updates = run.get("update_seconds", {})
    raw = run["median_step_seconds"] - sum(updates.values())
    return (raw + updates[name]) / raw if raw > 0 else math.nan


def cpu_ratio(timing: list[dict[str, Any]], study: str, method: str) -> float | None:
    """Median CPU seconds per step of ``method`` over vanilla's, from the ``timing`` runs (None if absent)."""
    by_label = {r["label"]: r["median_cpu_step_seconds"] for r in timing}
    own, base = by_label.get(f"{study}-{method}"), by_label.get(f"{study}-{VANILLA[study]}")
    return own / base if own is not None and base else None


def _step_ratio(study: str, runs: list[dict[str, Any]], method: str, seed: int, timing: list[dict[str, Any]]) -> float:
    if study == "sft":
        run = next(r for r in runs if r["seed"] == seed)
        return _update_ratio(run, method)
    measured = cpu_ratio(timing, study, method)
    if measured is not None:
        return measured
    vanilla = next((r for r in runs if r["seed"] == seed and r["label"] == VANILLA[study]), None)
    own = next((r for r in runs if r["seed"] == seed and r["label"] == method), None)
    if vanilla is None or own is None:
        return math.nan
    return own["median_step_seconds"] / vanilla["median_step_seconds"]


def study_rows(
    study: str, runs: list[dict[str, Any]], timing: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per method: final value, best value, steps to vanilla's best, step-time ratio (means over seeds)."""
    lower = study != "dpo"
    curves = method_curves(study, runs)
    vanilla = curves.get(VANILLA[study], {})
    rows = []
    order = sorted(curves, key=lambda m: m != VANILLA[study])  # vanilla first, then in run order
    for method in order:
        by_seed = curves[method]
        finals = {seed: c[-1][1] for seed, c in by_seed.items()}
        reach = {
            seed: steps_to_reach(c, _best(vanilla[seed], lower), lower) if seed in vanilla else None
            for seed, c in by_seed.items()
        }  # fmt: skip
        ratios = [_step_ratio(study, runs, method, seed, timing or []) for seed in by_seed]
        row = {
            "method": method,
            "final": _mean(list(finals.values())),
            "final_by_seed": finals,
            "best": _mean([_best(c, lower) for c in by_seed.values()]),
            "mean_over_run": _mean([_mean([v for step, v in c if step > 0]) for c in by_seed.values()]),
            "steps_to_vanilla_best": reach,
            "step_time_ratio": _mean([r for r in ratios if not math.isnan(r)]),
        }
        if study == "sft":
            row["shadow_mib"] = _mean([r["shadow_mib"][method] for r in runs]) if method != "raw" else None
        if study == "dpo":
            run = next(r for r in runs if r["label"] == method)
            for key in ("margin_vs_initial", "accuracy_vs_ref", "margin_vs_ref"):
                row[key] = run["curves"][key][-1][1]
        if study == "lowdata":
            run = next(r for r in runs if r["label"] == method)
            teacher = [k for k in run["curves"] if k != "raw"]
            row["teacher_final"] = run["curves"][teacher[0]][-1][1] if teacher else None
        rows.append(row)
    return rows


def _reach_text(reach: dict[int, int | None], steps: int) -> str:
    return ", ".join(f"s{seed}: {step if step is not None else 'not reached'}" for seed, step in sorted(reach.items()))


def results_markdown(results: list[dict[str, Any]], command: str) -> str:
    """The results table of every study found in ``results``."""
    grouped = _by_study(results)
    lines = ["# Evidence: results table", "", f"Reproduce: `{command}`", ""]
    if results:
        env = results[0]["environment"]
        scale = results[0]["scale"]
        lines += [
            f"Scale `{scale['name']}`: model `{scale['model']}`, LoRA r={scale['lora_r']} α={scale['lora_alpha']} on "
            f"{', '.join(scale['target_modules'])}, batch {scale['batch_size']}, max length {scale['max_length']} tokens, "
            f"eval set {scale['n_eval']} held-out functions. Python {env['python']}, torch {env['torch']}, "
            f"transformers {env['transformers']}, TRL {env['trl']}, PEFT {env['peft']}, {env['cpu_count']} CPU cores.",
            "",
        ]
    titles = {
        "sft": "(a) SFT: raw weights vs every averager (all in one run)",
        "lowdata": "(b) Low data: plain LoRA vs LoRA + self-distillation from an averaged teacher",
        "dpo": "(c) DPO: fixed reference vs averaged reference adapter",
    }
    for study in ("sft", "lowdata", "dpo"):
        runs = grouped.get(study)
        if not runs:
            lines += [f"## {titles[study]}", "", "Not run yet.", ""]
            continue
        seeds = sorted({r["seed"] for r in runs})
        steps = max(r["steps"] for r in runs)
        lines += [
            f"## {titles[study]}",
            "",
            f"{len(runs)} run(s), seeds {seeds}, {steps} optimizer steps. Mean eval loss over the run: the mean of "
            "the eval points after step 0 (how good the weights are along the way, not only at the end).",
            "",
        ]
        if study == "dpo":
            lines[-2] = (
                f"{len(runs)} run(s), seed {seeds}, {steps} optimizer steps. Reward accuracy and margin on held-out "
                "pairs, against the initial model (comparable across methods) and against each run's own reference."
            )
        rows = study_rows(study, runs, grouped.get("timing"))
        if study == "dpo":
            lines += [
                "| method | final reward accuracy vs initial model | final margin vs initial | final accuracy vs own ref "
                "| final margin vs own ref | steps to fixed-ref's best accuracy | step-time ratio |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['method']} | {_fmt(r['final'], 3)} | {_fmt(r['margin_vs_initial'])} | {_fmt(r['accuracy_vs_ref'], 3)} "
                    f"| {_fmt(r['margin_vs_ref'])} | {_reach_text(r['steps_to_vanilla_best'], steps)} | {_fmt(r['step_time_ratio'], 2)} |"
                )
        else:
            vanilla = "raw" if study == "sft" else "plain"
            extra = " shadow MiB (fp32) |" if study == "sft" else " teacher's own final eval loss |"
            lines += [
                f"| method | final eval loss (mean) | per seed | best eval loss | mean eval loss over the run "
                f"| steps to {vanilla}'s best | step-time ratio |{extra}",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                per_seed = ", ".join(f"{v:.4f}" for _, v in sorted(r["final_by_seed"].items()))
                tail = _fmt(r.get("shadow_mib"), 2) if study == "sft" else _fmt(r.get("teacher_final"))
                lines.append(
                    f"| {r['method']} | {_fmt(r['final'])} | {per_seed} | {_fmt(r['best'])} | {_fmt(r['mean_over_run'])} "
                    f"| {_reach_text(r['steps_to_vanilla_best'], steps)} | {_fmt(r['step_time_ratio'], 4 if study == 'sft' else 2)} "
                    f"| {tail} |"
                )
            median = _mean([r["median_step_seconds"] for r in runs if study == "sft" or r["label"] == vanilla])
            lines += ["", f"Median {vanilla} optimizer step: {median:.2f} s wall (mean over its runs)."]
            if study == "sft":
                updates = defaultdict(list)
                for run in runs:
                    for name, seconds in run.get("update_seconds", {}).items():
                        updates[name].append(seconds * 1000)
                lines.append(
                    "Mean update per optimizer step: "
                    + ", ".join(f"{n} {_mean(v):.1f} ms" for n, v in updates.items())
                    + ". Each averager also costs one extra evaluation pass per evaluation (not in the ratio)."
                )
        if study != "sft":
            source = "CPU seconds of the timing runs" if grouped.get("timing") else "wall seconds of these runs"
            lines += ["", f"Step-time ratio from the median {source}."]
        lines.append("")
    timing = grouped.get("timing")
    if timing:
        lines += [
            "## Step times (timing runs, no evaluation)",
            "",
            "| run | steps | median CPU s / step | median wall s / step |",
            "|---|---|---|---|",
        ]
        for run in timing:
            lines.append(
                f"| {run['label']} | {run['steps']} | {run['median_cpu_step_seconds']:.2f} | {run['median_step_seconds']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def _plot_mean(ax: Any, by_seed: dict[int, list[list[float]]], label: str, **style: Any) -> None:
    steps = sorted({s for c in by_seed.values() for s, _ in c})
    table = [{int(s): v for s, v in c} for c in by_seed.values()]
    xs, mean, lo, hi = [], [], [], []
    for step in steps:
        values = [t[step] for t in table if step in t]
        if len(values) == len(table):
            xs.append(step)
            mean.append(statistics.mean(values))
            lo.append(min(values))
            hi.append(max(values))
    (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=label, **style)
    if len(table) > 1:
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)


def plot_sft(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    curves = method_curves("sft", runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, by_seed in curves.items():
        style = {"color": "black", "linewidth": 2} if method == "raw" else {}
        _plot_mean(left, by_seed, method, **style)
        delta = {
            seed: [[s, v - dict(map(tuple, curves["raw"][seed]))[s]] for s, v in c]
            for seed, c in by_seed.items() if seed in curves["raw"]
        }  # fmt: skip
        _plot_mean(right, delta, method, **style)
    seeds = sorted({r["seed"] for r in runs})
    left.set(
        xlabel="optimizer step",
        ylabel="held-out eval loss",
        title=f"(a) SFT eval loss (mean of seeds {seeds}; band: min–max)",
    )
    right.set(
        xlabel="optimizer step",
        ylabel="eval loss − raw eval loss (same seed)",
        title="difference to the raw weights (< 0: average is better)",
    )
    right.axhline(0, color="grey", linewidth=0.8)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lowdata(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    students = method_curves("lowdata", runs)
    colors = {}
    for method, by_seed in students.items():
        _plot_mean(ax, by_seed, f"{method} (student)")
        colors[method] = ax.lines[-1].get_color()
    for run in runs:
        for name, curve in run["curves"].items():
            if name != "raw" and run["seed"] == min(r["seed"] for r in runs):
                ax.plot(
                    *zip(*curve, strict=True),
                    linestyle="--",
                    color=colors[run["label"]],
                    label=f"{run['label']}: teacher {name}",
                )
    n_train = runs[0]["scale"]["lowdata_train"]
    ax.set(
        xlabel="optimizer step",
        ylabel="held-out eval loss",
        title=f"(b) {n_train} training examples: self-distillation",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dpo(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = [
        ("accuracy_vs_initial", "reward accuracy vs the initial model"),
        ("margin_vs_initial", "reward margin vs the initial model"),
        ("accuracy_vs_ref", "reward accuracy vs the run's own reference"),
        ("margin_vs_ref", "reward margin vs the run's own reference"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, keys, strict=True):
        for run in runs:
            ax.plot(*zip(*run["curves"][key], strict=True), marker="o", markersize=3, label=run["label"])
        ax.set(xlabel="optimizer step", title=title)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("(c) DPO on held-out pairs: fixed vs averaged reference adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def initial_weight(
    t: int, decay: float | None = None, lag: float = 10, ema_power: float = 0.5, bias_power: float = 0.2
) -> float:
    """Coefficient of θ_0 (the weights at the start, step 0) in the average output at step t.

    EMA with decay d: d^t. BEMA: Π_{s=1..t} (1 − β_s) − α_t, since θ̂_t = α_t (θ_t − θ_0) + EMA_t.
    """
    if decay is not None:
        return decay**t
    keep = 1.0
    for s in range(1, t + 1):
        keep *= 1.0 - ema_step_size(s, lag, 1.0, ema_power, 0.0)
    return keep - bias_correction(t, lag, 1.0, bias_power)


def plot_schedules(steps: int, path: Path, lag: float = 10, ema_power: float = 0.5, bias_power: float = 0.2) -> None:
    """BEMA's β_t and α_t at TRL's defaults vs fixed EMA step sizes, and the weight each output keeps on θ_0."""
    import matplotlib.pyplot as plt

    ts = list(range(1, steps + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(
        ts, [ema_step_size(t, lag, 1.0, ema_power, 0.0) for t in ts], label=f"BEMA β_t = ({lag:g}+t)^-{ema_power:g}"
    )
    left.plot(
        ts, [bias_correction(t, lag, 1.0, bias_power) for t in ts], label=f"BEMA α_t = ({lag:g}+t)^-{bias_power:g}"
    )
    for decay in (0.9, 0.98):
        left.axhline(1 - decay, linestyle=":", color="grey")
        left.text(ts[-1], 1 - decay, f"EMA {decay}: 1−d", ha="right", va="bottom", fontsize=8)
    left.set(xlabel="optimizer step t", ylabel="weight", title="BEMA schedule (TRL defaults) vs EMA step sizes")
    left.legend(fontsize=8)
    for decay in (0.9, 0.98):
        right.plot(ts, [initial_weight(t, decay) for t in ts], label=f"EMA {decay}: d^t")
    right.plot(ts, [initial_weight(t, None, lag, ema_power, bias_power) for t in ts], label="BEMA: Π(1−β_s) − α_t")
    right.axhline(0, color="grey", linewidth=0.8)
    right.set(xlabel="optimizer step t", ylabel="coefficient of θ_0", title="weight left on the starting weights θ_0")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULTS_BEGIN = "<!-- results: generated by benchmarks/evidence.py, do not edit -->"
RESULTS_END = "<!-- end of results -->"


def fill_results_block(page: Path, markdown: str, begin: str = RESULTS_BEGIN, end: str = RESULTS_END) -> bool:
    """Replace the text between the markers ``begin`` and ``end`` of ``page`` with the tables; False if it has none."""
    text = page.read_text()
    if begin not in text or end not in text:
        return False
    body = markdown.split("\n", 2)[2].lstrip("\n")  # drop the "# Evidence: results table" heading
    body = body.replace("\n## ", "\n### ")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    page.write_text(f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")
    return True


def write_tables(
    docs: str | Path, name: str, markdown: str, begin: str = RESULTS_BEGIN, end: str = RESULTS_END
) -> list[Path]:
    """``docs/<name>`` with ``markdown``, and the block of ``docs/evidence.md`` between ``begin`` and ``end`` if the
    page has one; return what was written."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    table = docs / name
    table.write_text(markdown)
    written = [table]
    page = docs / "evidence.md"
    if page.is_file() and fill_results_block(page, markdown, begin, end):
        written.append(page)
    return written


def use_agg_backend(table: Path) -> None:
    """Select matplotlib's file backend; without matplotlib, say that ``table`` is written and how to get plots."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            f"wrote {table}; the plots need matplotlib: pip install matplotlib "
            "(or pip install 'trl-ema-plugin[experiments]'), then rerun with --report-only"
        ) from None
    matplotlib.use("Agg")


def write_report(results: list[dict[str, Any]], docs: str | Path, command: str) -> list[Path]:
    """Write ``results.md`` and then ``evidence_*.png`` under ``docs`` from whatever runs finished.

    Without matplotlib the table is still written, then an ImportError says how to get the plots.
    """
    docs = Path(docs)
    written = write_tables(docs, "results.md", results_markdown(results, command))
    use_agg_backend(written[0])
    grouped = _by_study(results)
    plots = {"sft": plot_sft, "lowdata": plot_lowdata, "dpo": plot_dpo}
    for study, plot in plots.items():
        if grouped.get(study):
            path = docs / f"evidence_{study}.png"
            plot(grouped[study], path)
            written.append(path)
    steps = max((r["steps"] for r in grouped.get("sft", [])), default=60)
    plot_schedules(steps, docs / "evidence_bema_schedule.png")
    written.append(docs / "evidence_bema_schedule.png")
    return written
