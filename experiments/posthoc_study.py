"""Issue 17 evidence: post-hoc EMA on issue 11's recorded SmolLM2 LoRA SFT trajectories.

A recorded run θ_0..θ_T (:mod:`experiments.trajectory`, every optimizer step) goes through the post-hoc recorder's
own code (:func:`trl_ema_plugin.posthoc.replay`: the files an online ``PostHocEMACallback`` with the same settings
writes, bit for bit, ``tests/test_posthoc_recorder.py``): σ_rel 0.05 and 0.10 from step 0, a snapshot every
``--every`` steps (default 20) and at the last one. Then, at the final step T:

* **accuracy**: each synthesized σ_rel against the exact power-function EMA of the every-step trajectory
  (θ_j weighted by (j/T)^(γ+1) − ((j−1)/T)^(γ+1)), relative to the distance between that EMA and θ_T;
* **eval loss** of the σ_rel grid, of post-hoc BEMA (the synthesized EMA + α_T (θ_T − θ_0), α_T = TRL's BEMA α at T)
  and of issue 11's online averagers (raw, ``ema`` 0.9 / 0.98, ``dema``, ``ouema``, TRL's ``bema``, with its names
  and settings), by issue 11's evaluator (:mod:`experiments.offline`: completion-token NLL on 32 held-out functions
  picked by the run's seed). An online number comes from issue 11's cache (``--online-cache``, read only) where it
  holds the run at T, else it is computed here by the same code into this study's cache;
* the **LoRA factor gap** per σ_rel: ‖B̂·Â − EMA(B·A)‖_F / ‖EMA(B·A)‖_F over all LoRA pairs, with B̂, Â the
  synthesized factors and EMA(B·A) the exact power EMA of the product (as ``benchmarks/lora_factor_gap.py``), next
  to the same gap of the exact factor EMAs (the factor caveat alone) and of the raw θ_T (products in fp32, sums
  in float64);
* **cost**: bytes and seconds per snapshot (fp32, bf16: every EMA and θ, written and fsynced), milliseconds per
  update of the two EMAs (one runner: θ read once), the adapter laid out flat as the callback lays it out.

Results are cached per run (re-running computes only what is missing)::

    nice -n 19 python -m experiments.posthoc_study run sft-seed100-steps240-n1024-full
    python -m experiments.posthoc_study report sft-seed100-steps240-n1024-full

Needs issue 11's :mod:`experiments.trajectory` and :mod:`experiments.offline` (branch h11 until it is merged) and
its recordings (``--trajectories``, default ``/work/data/bema-study/trajectories``); writes under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trl_ema_plugin.averagers.power import sigma_rel_to_gamma
from trl_ema_plugin.config.posthoc import PostHocEMAConfig
from trl_ema_plugin.posthoc import PostHocRecorder, list_snapshots, plan_synthesis, replay, synthesize
from trl_ema_plugin.posthoc.synthesis import combine, live_weights
from trl_ema_plugin.shadow import LocalLayout

from .offline import RAW, ResultCache, eval_model, evaluate_run
from .trajectory import STEP_FILE, Trajectory

DEFAULT_TRAJECTORIES = Path(os.environ.get("BEMA_STUDY_DATA", "/work/data/bema-study")) / "trajectories"
DEFAULT_OUT = Path(os.environ.get("POSTHOC_STUDY_DATA", "/work/data/posthoc-study"))
DEFAULT_ONLINE_CACHE = DEFAULT_TRAJECTORIES.parent / "results"
RECORDED = (0.05, 0.10)
EVERY = 20
#: from below EMA 0.9 (σ_rel ≈ 0.04 of 240 steps) to about EMA 0.98 (≈ 0.2)
GRID = (0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2)
N_EVAL = 32
#: the online averagers of issue 11 (its names and settings): raw θ_T, two EMAs, DEMA, OUEMA, TRL's BEMA
ONLINE: dict[str, dict[str, Any]] = {
    RAW: {},
    "ema_0.9": {"method": "ema", "decay": 0.9},
    "ema_0.98": {"method": "ema", "decay": 0.98},
    "dema": {"method": "dema", "update_every": 1},
    "ouema": {"method": "ouema", "update_every": 1},
    "bema_trl": {"method": "bema", "update_every": 1},
}
BEMA_LAG, BEMA_MULTIPLIER, BEMA_BIAS_POWER = 10.0, 1.0, 0.2  # TRL's BEMACallback defaults


def bema_alpha(step: int) -> float:
    """α_T = (ρ + γ·T)^−η of TRL's default BEMA at step T."""
    return (BEMA_LAG + BEMA_MULTIPLIER * step) ** -BEMA_BIAS_POWER


def steps_of(trajectory: Trajectory) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    for t in range(trajectory.steps + 1):
        yield t, trajectory.theta(t)


# --------------------------------------------------------------------------------- snapshots
def record(trajectory: Trajectory, folder: Path, every: int) -> dict[str, Any]:
    """Replay the run into ``folder`` (once) and time it."""
    config = PostHocEMAConfig(sigma_rels=list(RECORDED), every=every)
    if not list(folder.glob("snapshot-*.safetensors")) or list_snapshots(folder)[-1].global_step != trajectory.steps:
        started = time.process_time()
        replay(steps_of(trajectory), config, folder, every)
        seconds = time.process_time() - started
    else:
        seconds = None
    snapshots = list_snapshots(folder)
    return {
        "every": every,
        "snapshots": [s.global_step for s in snapshots],
        "replay_cpu_seconds": seconds,
        "bytes_fp32": (folder / snapshots[-1].path.name).stat().st_size,
    }


@torch.no_grad()
def cost(trajectory: Trajectory, repeats: int = 5) -> dict[str, Any]:
    """Bytes and seconds per snapshot (fp32, bf16: every EMA and θ, written and fsynced), and per update of the
    two EMAs; one thread, the adapter laid out in one flat buffer as ``PostHocEMACallback`` lays it out."""
    theta = trajectory.theta(trajectory.steps)
    named = [(n, torch.nn.Parameter(theta[n].clone(), requires_grad=False)) for n in trajectory.names]
    layout = LocalLayout(named)
    layout.make_contiguous()
    out: dict[str, Any] = {"parameters": sum(p.numel() for _, p in named), "tensors": len(named)}
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as work:
            config = PostHocEMAConfig(sigma_rels=list(RECORDED), dtype=dtype)
            recorder = PostHocRecorder(config, layout, work, every=10**9, device="cpu")
            recorder.begin(0, writer=True)
            update, snapshot = [], []
            for step in range(1, 1 + repeats):
                started = time.perf_counter()
                recorder.step(step, writer=True)  # an update only (no snapshot is due)
                update.append(time.perf_counter() - started)
                started = time.perf_counter()
                recorder.snapshot(step, writer=True)
                snapshot.append(time.perf_counter() - started)
            size = os.path.getsize(Path(work) / f"snapshot-{1:08d}.safetensors")
        out[dtype] = {"bytes": size, "seconds": statistics.median(snapshot)}
        out.setdefault("update_ms", 1000 * statistics.median(update))
    return out


# ------------------------------------------------------------------------------ exact EMAs
def profile_weights(steps: int, gamma: float) -> list[float]:
    """w_j = (j/T)^(γ+1) − ((j−1)/T)^(γ+1), j = 1..T: the exact power-function EMA at T (averaging from step 0)."""
    return [(j / steps) ** (gamma + 1) - ((j - 1) / steps) ** (gamma + 1) for j in range(1, steps + 1)]


def _handles(stack: ExitStack, trajectory: Trajectory) -> list[Any]:
    return [
        stack.enter_context(safe_open(str(trajectory.folder / STEP_FILE.format(t)), "pt"))
        for t in range(trajectory.steps + 1)
    ]


@torch.no_grad()
def accuracy_and_factor_gap(trajectory: Trajectory, folder: Path) -> dict[str, Any]:
    """Per σ_rel of :data:`GRID`: the synthesis error against the exact EMA, and the LoRA factor gaps."""
    T = trajectory.steps
    weights = {s: torch.tensor(profile_weights(T, sigma_rel_to_gamma(s)), dtype=torch.float64) for s in GRID}
    synthesized = {s: synthesize(folder, s) for s in GRID}
    raw = live_weights(folder)
    error2 = dict.fromkeys(GRID, 0.0)
    distance2 = dict.fromkeys(GRID, 0.0)
    gap = {s: {"synthesized": 0.0, "exact_factors": 0.0, "raw": 0.0, "norm": 0.0} for s in GRID}
    with ExitStack() as stack:
        handles = _handles(stack, trajectory)
        for name in trajectory.names:
            series = torch.stack([h.get_tensor(name).to(torch.float64) for h in handles[1:]])  # θ_1..θ_T
            for s in GRID:
                exact = torch.tensordot(weights[s], series, dims=1)
                error2[s] += float((synthesized[s][name].double() - exact).square().sum())
                distance2[s] += float((raw[name].double() - exact).square().sum())
        pairs = [n for n in trajectory.names if "lora_A" in n]
        for a_name in pairs:
            b_name = a_name.replace("lora_A", "lora_B")
            a = torch.stack([h.get_tensor(a_name) for h in handles[1:]]).float()  # [T, r, n]
            b = torch.stack([h.get_tensor(b_name) for h in handles[1:]]).float()  # [T, m, r]
            rows = b.shape[1]
            stacked_a = a.reshape(-1, a.shape[2])  # [T·r, n]
            last = (raw[b_name] @ raw[a_name]).double()
            for s in GRID:
                w = weights[s].float()
                # Σ_j w_j B_j A_j as one product: [m, T·r] @ [T·r, n]
                exact = ((w[:, None, None] * b).permute(1, 0, 2).reshape(rows, -1) @ stacked_a).double()
                factors = (torch.tensordot(w, b, dims=1) @ torch.tensordot(w, a, dims=1)).double()
                synth = (synthesized[s][b_name] @ synthesized[s][a_name]).double()
                for key, value in (("synthesized", synth), ("exact_factors", factors), ("raw", last)):
                    gap[s][key] += float((value - exact).square().sum())
                gap[s]["norm"] += float(exact.square().sum())
    out = {}
    for s in GRID:
        plan = plan_synthesis(folder, s)
        norm = gap[s].pop("norm")
        out[str(s)] = {
            "residual": plan.residual,
            "mass": plan.mass,
            "weight_l1": plan.weight_l1,
            "error_vs_distance_to_raw": math.sqrt(error2[s] / distance2[s]),
            "factor_gap": {k: math.sqrt(v / norm) for k, v in gap[s].items()},
        }
    return out


# ------------------------------------------------------------------------------------ eval
def online_from_issue11(cache_dir: Path | None, run_id: str, step: int, context: dict[str, Any]) -> dict[str, float]:
    """The online averagers' losses at ``step`` that issue 11's cache holds for this run (read only), under the
    names and settings of :data:`ONLINE`."""
    path = None if cache_dir is None else cache_dir / f"{run_id}-eval{N_EVAL}.json"
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data["context"] != context:
        return {}
    found = {}
    for name, spec in ONLINE.items():
        result = data["results"].get(f"{name}@{step}")
        if result is not None and data["settings"].get(name) == spec:
            found[name] = float(result["loss"])
    return found


def evaluate(
    trajectory: Trajectory, folder: Path, cache_path: Path, online_cache: Path | None
) -> tuple[dict[str, float], dict[str, str]]:
    """Eval losses at T: the online averagers (issue 11's cache, or replayed here by its code), the σ_rel grid and
    post-hoc BEMA; and where each online number came from."""
    T = trajectory.steps
    context = {
        "run": trajectory.run_id,
        "n_eval": N_EVAL,
        "eval_seed": trajectory.seed,
        "metric": "completion-token mean NLL",
    }
    cache = ResultCache(cache_path, context)
    issue11 = online_from_issue11(online_cache, trajectory.run_id, T, context)
    sources = {name: "issue 11 cache" if name in issue11 else "computed here" for name in ONLINE}
    scale = trajectory.meta["scale"]
    from .runner import PRESETS

    preset = PRESETS[trajectory.meta["scale_name"]]
    recorded = {**scale, "target_modules": tuple(scale["target_modules"]), "seeds": tuple(scale["seeds"])}
    if preset.as_dict() != recorded:
        raise ValueError(f"{trajectory.folder} was recorded at another scale than PRESETS[{preset.name!r}]")
    loss = None
    candidates: dict[str, tuple[dict[str, Any], Any]] = {}
    alpha = bema_alpha(T)
    for s in GRID:
        candidates[f"posthoc_{s}"] = ({"sigma_rel": s}, lambda s=s: combine(plan_synthesis(folder, s)))
        bema_spec = {"sigma_rel": s, "alpha": alpha}
        candidates[f"posthoc_bema_{s}"] = (bema_spec, lambda s=s: _posthoc_bema(folder, s, alpha))
    todo_online = {name: {T} for name in ONLINE if name not in issue11 and cache.get(name, T) is None}
    todo_posthoc = [name for name in candidates if cache.get(name, T) is None]
    if todo_online or todo_posthoc:
        model, loss = eval_model(preset, trajectory.seed, N_EVAL)
        del model
    if todo_online:
        evaluate_run(trajectory, {n: ONLINE[n] for n in todo_online}, todo_online, cache, loss)
    for name in todo_posthoc:
        spec, build = candidates[name]
        cache.register(name, spec)
        started = time.process_time()
        result = {**loss(build()), "step": T, "setting": name, "cpu_seconds": time.process_time() - started}
        cache.put(name, T, result)
    for name, (spec, _) in candidates.items():
        cache.register(name, spec)
    losses = {name: issue11[name] if name in issue11 else cache.get(name, T)["loss"] for name in ONLINE}
    return {**losses, **{name: cache.get(name, T)["loss"] for name in candidates}}, sources


def _posthoc_bema(folder: Path, sigma_rel: float, alpha: float) -> dict[str, torch.Tensor]:
    from trl_ema_plugin.posthoc import synthesize_bema

    return synthesize_bema(folder, sigma_rel, alpha)


# ---------------------------------------------------------------------------------- driver
def study(
    run_id: str, trajectories: Path, out: Path, every: int = EVERY, online_cache: Path | None = None,
    with_eval: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Every measurement of one recorded run; results in ``out/<run id>-every<N>.json``, snapshots in
    ``out/<run id>/posthoc-every<N>/``."""
    torch.set_num_threads(1)
    trajectory = Trajectory(trajectories / run_id)
    folder = out / run_id / f"posthoc-every{every}"
    results_path = out / f"{run_id}-every{every}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"run": run_id}
    recorded = record(trajectory, folder, every)
    if recorded["replay_cpu_seconds"] is None:  # recorded by an earlier call: keep its timing
        recorded["replay_cpu_seconds"] = results.get("record", {}).get("replay_cpu_seconds")
    results["record"] = recorded
    if "cost" not in results:
        results["cost"] = cost(trajectory)
    if "synthesis" not in results:
        started = time.process_time()
        results["synthesis"] = accuracy_and_factor_gap(trajectory, folder)
        results["synthesis_cpu_seconds"] = time.process_time() - started
    _save(results_path, results)
    if with_eval:
        cache_path = out / f"{run_id}-eval{N_EVAL}.json"
        results["eval_loss"], results["online_source"] = evaluate(trajectory, folder, cache_path, online_cache)
        results["bema_alpha"] = bema_alpha(trajectory.steps)
        _save(results_path, results)
    return results


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def report(results: dict[str, Any]) -> str:
    """Markdown tables of one run's results."""
    run, synthesis, losses = results["run"], results["synthesis"], results.get("eval_loss", {})
    lines = [
        f"### {run}",
        "",
        "| σ_rel | residual | Σ\\|x\\| | error / ‖EMA − θ_T‖ | factor gap: synthesized | exact factors | raw θ_T | eval loss | post-hoc BEMA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, row in synthesis.items():
        gap = row["factor_gap"]
        loss = losses.get(f"posthoc_{s}")
        bema = losses.get(f"posthoc_bema_{s}")
        lines.append(
            f"| {s} | {row['residual']:.2e} | {row['weight_l1']:.2f} | {row['error_vs_distance_to_raw']:.2e} | "
            f"{gap['synthesized']:.2e} | {gap['exact_factors']:.2e} | {gap['raw']:.2e} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {'' if bema is None else f'{bema:.4f}'} |"
        )
    if losses:
        sources = results.get("online_source", {})
        lines += ["", "| online averager | eval loss | from |", "|---|---|---|"]
        lines += [f"| {name} | {losses[name]:.4f} | {sources.get(name, '')} |" for name in ONLINE if name in losses]
    c = results["cost"]
    lines += [
        "",
        f"{c['parameters']:,} trainable parameters in {c['tensors']} tensors; snapshot every {results['record']['every']} "
        f"steps; fp32 snapshot {c['float32']['bytes'] / 2**20:.1f} MiB in {1000 * c['float32']['seconds']:.0f} ms, "
        f"bf16 {c['bfloat16']['bytes'] / 2**20:.1f} MiB in {1000 * c['bfloat16']['seconds']:.0f} ms; "
        f"update of the two EMAs {c['update_ms']:.2f} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("runs", nargs="+", help="recorded run ids, e.g. sft-seed100-steps240-n1024-full")
    parser.add_argument("--trajectories", type=Path, default=DEFAULT_TRAJECTORIES, help="issue 11's recordings")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="snapshots, results and the eval cache")
    parser.add_argument("--every", type=int, default=EVERY, help="optimizer steps between snapshots")
    parser.add_argument(
        "--online-cache", type=Path, default=DEFAULT_ONLINE_CACHE, help="issue 11's eval cache (read only)"
    )
    parser.add_argument("--no-eval", action="store_true", help="synthesis accuracy, factor gap and cost only")
    args = parser.parse_args(argv)
    for run_id in args.runs:
        if args.command == "run":
            results = study(run_id, args.trajectories, args.out, args.every, args.online_cache, not args.no_eval)
        else:
            results = json.loads((args.out / f"{run_id}-every{args.every}.json").read_text())
        print(report(results), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
