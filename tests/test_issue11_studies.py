"""Issue 11's second round of evidence on the tiny model, in seconds: the probe around θ_t
(experiments/bema_probe.py), the self-distillation sweep (sd_study.py) and the DPO study where the reference
matters (dpo_study.py). The documented runs are their commands on SmolLM2; these check that the code does what
their protocols say."""

from __future__ import annotations

import pytest
import torch

from experiments import dpo_study, sd_study
from experiments.bema_probe import POINTS, RECENT, point_name, probe_point, report, run_probe
from experiments.offline import RAW
from experiments.studies import load_results
from experiments.trajectory import RecordedRun, Trajectory, record


def test_probe_points_lie_in_the_plane_of_bemas_outputs_and_are_reported(tmp_path):
    run = RecordedRun(seed=4, steps=RECENT + 2, n_train=16, scale_name="tiny")
    trajectory = Trajectory(record(run, tmp_path / "trajectories"))
    t = RECENT + 1
    now, start, before = trajectory.theta(t), trajectory.theta(0), trajectory.theta(t - RECENT)
    assert all(torch.equal(v, now[k]) for k, v in probe_point(trajectory, t, 0.0, 0.0).items())
    moved = probe_point(trajectory, t, 0.1, -0.3)
    for name, value in moved.items():
        expected = now[name] + 0.1 * (now[name] - start[name]) - 0.3 * (now[name] - before[name])
        torch.testing.assert_close(value, expected)
    assert any(not torch.equal(moved[k], now[k]) for k in now)  # the run moved: the probe leaves θ_t

    run_probe(tmp_path, [(run, (t,))], n_eval=4)
    table = report(tmp_path, [(run, (t,))], n_eval=4)
    row = next(line for line in table.splitlines() if line.startswith(f"| T={run.steps}, step {t} |"))
    cells = row.strip("|").split("|")[1:]
    assert len(cells) == len(POINTS) and all(c.strip().endswith(("0/1", "1/1")) for c in cells)
    run_probe(tmp_path, [(run, (t,))], n_eval=4)  # resumed: nothing left to evaluate, the same table
    assert report(tmp_path, [(run, (t,))], n_eval=4) == table
    names = {RAW, *(point_name(a, b) for a, b in POINTS)}
    assert all(f"{n}@{t}" in (tmp_path / "results" / f"{run.run_id}-eval4-probe.json").read_text() for n in names)


def test_self_distillation_sweep_screens_one_seed_and_replicates_the_choice(tmp_path, capsys):
    scale = sd_study.study_scale("tiny")
    sd_study.run_stage("screen", tmp_path, scale, show_progress=False)
    screened = {r["label"]: r for r in load_results(tmp_path)}
    assert set(screened) == {"plain", *sd_study.screen_settings()} and {r["seed"] for r in screened.values()} == {1}
    assert screened["bema_fade_lambda0.9"]["settings"]["distillation"]["lambda_"] == 0.9
    assert screened["bema_fade_tau2"]["settings"]["distillation"]["temperature"] == 2.0
    for label, result in screened.items():
        teacher_curves = set(result["curves"]) - {"raw"}
        assert teacher_curves == (set() if label == "plain" else {result["settings"]["averagers"][0]["name"]})
        assert (result.get("teacher_forwards", 0) > 0) == (label != "plain")

    with pytest.raises(ValueError, match=r"chosen='best'.*one of \['bema_fade'"):
        sd_study.plan("replication", scale, chosen="best")
    sd_study.run_stage("replication", tmp_path, scale, chosen="ema0.98", show_progress=False)
    replicated = [(r["label"], r["seed"]) for r in load_results(tmp_path) if r["seed"] != 1]
    assert sorted(replicated) == [("ema0.98", 2), ("ema0.98", 3), ("plain", 2), ("plain", 3)]
    table = sd_study.report(tmp_path)
    assert "ema0.98 − plain, end: mean" in table and "/2 seeds below" in table
    assert "bema_fade − plain" not in table  # screened on seed 1 only: no replication line
    capsys.readouterr()  # the runs' trainer logs
    assert sd_study.main(["report", "--out", str(tmp_path)]) == 0 and capsys.readouterr().out.strip() == table


def test_dpo_study_trains_every_reference_on_every_seed_and_reports_against_the_fixed_one(tmp_path):
    scale = dpo_study.study_scale("tiny")
    assert [(r.label, r.seed) for r in dpo_study.plan(scale)][:3] == [
        ("fixed_ref", 1),
        ("fixed_ref", 2),
        ("bema_ref", 1),
    ]
    dpo_study.run_study(tmp_path, scale, show_progress=False)
    results = load_results(tmp_path)
    assert len(results) == 6 and all(r["curves"]["margin_vs_initial"][-1][0] == scale.dpo_steps for r in results)
    fixed = [r for r in results if r["label"] == "fixed_ref"]
    for r in fixed:  # a fixed reference is the initial model: both views agree
        assert r["curves"]["margin_vs_ref"] == r["curves"]["margin_vs_initial"]
    table = dpo_study.report(tmp_path)
    assert "| fixed_ref |" in table and "bema_ref − fixed_ref, margin_vs_initial at the end:" in table


def test_paired_differences_are_summarised_with_their_standard_error_and_sign_counts():
    from experiments.deltas import delta_cell, paired_summary

    deltas = [-0.002, -0.001, 0.0005]
    # mean −0.000833, stdev 0.001258 → s.e. 0.000726
    assert paired_summary(deltas) == "-0.0008 ± 0.0007 (s.e.), [-0.0020, +0.0005], 2/3 seeds below"
    assert paired_summary(deltas, count="above").endswith("1/3 seeds above")
    assert delta_cell(deltas, digits=4) == "-0.0008 [-0.0020, +0.0005] 2/3"
    with pytest.raises(ValueError, match=r"count='better'; allowed values: below, above"):
        paired_summary(deltas, count="better")
