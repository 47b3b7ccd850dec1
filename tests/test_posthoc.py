"""Post-hoc EMA (EDM2): the power-function EMA, the synthesis solve, the snapshot files, real math, no mocks."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trl_ema_plugin.averagers.power import (
    SIGMA_REL_MAX,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    power_function_beta,
    sigma_rel_to_gamma,
)
from trl_ema_plugin.posthoc import (
    list_snapshots,
    plan_synthesis,
    read_snapshot,
    solve_coefficients,
    synthesize,
    synthesize_bema,
    write_snapshot,
    write_theta0,
)
from trl_ema_plugin.posthoc.snapshots import THETA0_FILE, snapshot_path

SHAPES = {
    "base_model.model.layers.0.q_proj.lora_A.default.weight": (4, 8),
    "base_model.model.layers.0.q_proj.lora_B.default.weight": (8, 4),
    "base_model.model.layers.0.norm.weight": (3,),
}
SIGMA_RELS = (0.05, 0.10)


# ----------------------------------------------------------------- helpers
def trajectory(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """θ_0..θ_steps: a random walk with drift per parameter (fp32); LoRA B starts at 0."""
    g = torch.Generator().manual_seed(seed)
    theta = {n: torch.randn(s, generator=g) * (0 if "lora_B" in n else 1) for n, s in SHAPES.items()}
    drift = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    out = [{n: x.clone() for n, x in theta.items()}]
    for _ in range(steps):
        theta = {n: x + 0.02 * drift[n] + 0.05 * torch.randn(x.shape, generator=g) for n, x in theta.items()}
        out.append({n: x.clone() for n, x in theta.items()})
    return out


def flat(theta: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [theta[n].reshape(-1) for n in SHAPES]


def unflat(views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: v.reshape(s).clone() for (n, s), v in zip(SHAPES.items(), views, strict=True)}


def record(folder: Path, traj, every: int, update_after: int = 0, cadence: int = 1, dtype: str = "float32"):
    """Drive one PowerFunctionEMA per σ_rel over ``traj`` as the recorder will, writing θ_0 and a snapshot
    every ``every`` steps after ``update_after``. Returns {step: {σ_rel: fp32 EMA tensors}}."""
    emas = {s: PowerFunctionEMA(s) for s in SIGMA_RELS}
    for ema in emas.values():
        ema.allocate([math.prod(s) for s in SHAPES.values()], "cpu")
    kept = {}
    for t, theta in enumerate(traj):
        for ema in emas.values():
            if t == update_after:
                ema.start(flat(theta), t)
            elif t > update_after and (t - update_after) % cadence == 0:
                ema.update(flat(theta), t)
        if t == update_after:
            write_theta0(folder, t, theta, dtype=dtype)
        elif t > update_after and (t - update_after) % every == 0:
            kept[t] = {s: unflat(e.views("ema")) for s, e in emas.items()}
            t_profile = next(iter(emas.values())).profile_time
            write_snapshot(folder, t, update_after, t_profile, kept[t], theta=theta, dtype=dtype)
    return kept


def gamma_numpy(sigma_rel: float) -> float:
    """EDM2's std_to_exp, independently: the largest real root by numpy."""
    s = sigma_rel**-2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def gram_by_integral(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """∫_0^min(t_a,t_b) (g_a+1) τ^g_a / t_a^(g_a+1) · (g_b+1) τ^g_b / t_b^(g_b+1) dτ, integrated by hand."""
    m = min(t_a, t_b)
    return (g_a + 1) * (g_b + 1) * m ** (g_a + g_b + 1) / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))


def exact_power_ema(traj64: np.ndarray, t: int, gamma: float, start: int = 0) -> np.ndarray:
    """EDM2's power-function EMA at t (steps after ``start``), exactly: θ_j weighted by
    (j/t)^(γ+1) − ((j−1)/t)^(γ+1), the profile (γ+1) τ^γ / t^(γ+1) integrated over (j−1, j]."""
    j = np.arange(1, t + 1, dtype=np.float64)
    w = (j / t) ** (gamma + 1) - ((j - 1) / t) ** (gamma + 1)
    return w @ traj64[start + 1 : start + t + 1]


# ------------------------------------------------------------ σ_rel ↔ γ
def test_sigma_rel_and_gamma_follow_edm2():
    for sigma_rel in (0.01, 0.05, 0.07, 0.10, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma == pytest.approx(gamma_numpy(sigma_rel), rel=1e-12)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-12)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's pair
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-12)  # the uniform average


@pytest.mark.parametrize("bad", [0, -0.1, 0.29, 1.0, float("nan"), float("inf"), "x", None])
def test_sigma_rel_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"sigma_rel=.* is out of range; allowed values: 0 < sigma_rel ≤ 0\.2887"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="sigma_rel="):
        PowerFunctionEMA(bad)


def test_power_function_beta_edges():
    assert power_function_beta(5.0, 1) == 0.0  # the first update forgets the starting weights
    assert power_function_beta(0.0, 4) == pytest.approx(0.75)  # γ = 0: the running mean
    with pytest.raises(ValueError, match="0 < t_delta ≤ t"):
        power_function_beta(5.0, 0)


# ------------------------------------------------- (d) the averager itself
@pytest.mark.parametrize(("update_after", "cadence"), [(0, 1), (3, 1), (2, 3)])
def test_power_ema_matches_float64_loop_and_closed_form(update_after, cadence):
    steps, sigma_rel = 40, 0.07
    traj = trajectory(steps, seed=1)
    ema = PowerFunctionEMA(sigma_rel)
    ema.allocate([math.prod(s) for s in SHAPES.values()], "cpu")
    gamma = gamma_numpy(sigma_rel)
    hand, last, updates = None, update_after, []
    for t, theta in enumerate(traj):
        x = torch.cat(flat(theta)).double()
        if t == update_after:
            ema.start(flat(theta), t)
            hand = x.clone()
        elif t > update_after and (t - update_after) % cadence == 0:
            ema.update(flat(theta), t)
            beta = (1 - (t - last) / (t - update_after)) ** (gamma + 1)
            hand = beta * hand + (1 - beta) * x
            last = t
            updates.append(t)
    out = [torch.empty_like(v) for v in flat(traj[-1])]
    ema.average_into(out, flat(traj[-1]), steps)
    got = torch.cat(out).double()
    torch.testing.assert_close(got, hand, rtol=1e-6, atol=1e-6)
    assert ema.profile_time == last - update_after
    # unrolled: weights (u_j^(γ+1) − u_{j−1}^(γ+1)) / t^(γ+1) over the update steps u_j (from the start)
    u = np.array([0] + [s - update_after for s in updates], dtype=np.float64)
    w = (u[1:] / u[-1]) ** (gamma + 1) - (u[:-1] / u[-1]) ** (gamma + 1)
    closed = sum(wj * torch.cat(flat(traj[s])).double() for wj, s in zip(w, updates, strict=True))
    torch.testing.assert_close(got, closed, rtol=1e-6, atol=1e-6)


# ------------------------------------- (a) a tracked σ_rel reproduces itself
@pytest.mark.parametrize("update_after", [0, 4])
def test_tracked_sigma_rel_at_a_snapshot_step_reproduces_that_ema(tmp_path, update_after):
    kept = record(tmp_path, trajectory(60), every=6, update_after=update_after)
    for step in (update_after + 24, update_after + 60 if update_after == 0 else update_after + 54):
        for sigma_rel in SIGMA_RELS:
            plan = plan_synthesis(tmp_path, sigma_rel, step)
            hit = [i.weight for i in plan.inputs if i.snapshot.global_step == step and i.profile.sigma_rel == sigma_rel]
            assert hit == [pytest.approx(1.0, abs=1e-8)]
            assert plan.residual < 1e-6
            got = synthesize(tmp_path, sigma_rel, step)
            for name in SHAPES:
                torch.testing.assert_close(got[name], kept[step][sigma_rel][name], rtol=1e-6, atol=1e-7)


def test_snapshots_between_sparse_updates_use_the_time_of_the_last_update(tmp_path):
    """update_every 3, a snapshot every 2 steps: a snapshot between updates holds the EMA of the last update
    (its t), and equal (t, γ) inputs are one input, not a singular system."""
    kept = record(tmp_path, trajectory(30), every=2, update_after=1, cadence=3)
    assert [s.t for s in list_snapshots(tmp_path)][:5] == [0, 3, 6, 6, 9]  # steps 3, 5, 7, 9, 11; updates 4, 7, 10
    plan = plan_synthesis(tmp_path, 0.10, step=9)
    assert sorted({(i.snapshot.global_step, i.snapshot.t) for i in plan.inputs}) == [(5, 3), (7, 6)]
    for sigma_rel in SIGMA_RELS:
        got = synthesize(tmp_path, sigma_rel, step=9)
        for name in SHAPES:
            torch.testing.assert_close(got[name], kept[9][sigma_rel][name], rtol=1e-6, atol=1e-7)


def test_bf16_snapshots_reproduce_within_bf16_rounding(tmp_path):
    kept = record(tmp_path, trajectory(30), every=5, dtype="bfloat16")
    assert list_snapshots(tmp_path)[0].dtype == "bfloat16"
    got = synthesize(tmp_path, 0.10)
    for name in SHAPES:
        torch.testing.assert_close(got[name], kept[30][0.10][name], rtol=2**-7, atol=1e-3)


# ------------------------------------ (b) an untracked σ_rel, by hand in float64
def test_untracked_sigma_rel_matches_float64_hand_solve(tmp_path):
    kept = record(tmp_path, trajectory(48), every=8)
    target_sigma, step = 0.075, 40
    inputs = [(t, s) for t in sorted(kept) if t <= step for s in SIGMA_RELS]
    gammas = {s: gamma_numpy(s) for s in (*SIGMA_RELS, target_sigma)}
    # Gram matrix and right-hand side from the profile integrals, checked once against quadrature
    A = np.array([[gram_by_integral(ta, gammas[sa], tb, gammas[sb]) for tb, sb in inputs] for ta, sa in inputs])
    b = np.array([gram_by_integral(ta, gammas[sa], step, gammas[target_sigma]) for ta, sa in inputs])
    tau = np.linspace(0, 16, 200_001)  # the product vanishes beyond min(t_a, t_b) = 16
    f = lambda t, g: np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)  # noqa: E731
    quadrature = np.trapezoid(f(24, gammas[0.05]) * f(16, gammas[0.1]), tau)
    assert quadrature == pytest.approx(gram_by_integral(24, gammas[0.05], 16, gammas[0.1]), rel=1e-7)
    x = np.linalg.solve(A, b)
    x = x / x.sum()
    plan = plan_synthesis(tmp_path, target_sigma, step)
    assert [(i.snapshot.global_step, i.profile.sigma_rel) for i in plan.inputs] == inputs
    np.testing.assert_allclose([i.weight for i in plan.inputs], x, rtol=1e-9, atol=1e-12)
    got = synthesize(tmp_path, target_sigma, step)
    for name in SHAPES:
        hand = sum(xi * kept[t][s][name].double() for xi, (t, s) in zip(x, inputs, strict=True))
        torch.testing.assert_close(got[name].double(), hand, rtol=1e-6, atol=1e-6)


def test_posthoc_bema_adds_alpha_times_theta_T_minus_theta0(tmp_path):
    traj = trajectory(20)
    record(tmp_path, traj, every=5, update_after=2)
    ema = synthesize(tmp_path, 0.08, 17)
    got = synthesize_bema(tmp_path, 0.08, alpha=0.3, step=17)
    for name in SHAPES:
        hand = ema[name].double() + 0.3 * (traj[17][name].double() - traj[2][name].double())
        torch.testing.assert_close(got[name].double(), hand, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"alpha=1\.5 is out of range; allowed values: 0 ≤ alpha ≤ 1"):
        synthesize_bema(tmp_path, 0.08, alpha=1.5)
    (tmp_path / THETA0_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"theta0\.safetensors does not exist"):
        synthesize_bema(tmp_path, 0.08, alpha=0.3)


# --------------------- (c) against the exact power-function EMA of a trajectory
def test_synthesis_error_against_exact_ema_shrinks_with_more_snapshots():
    """θ_j known for every step: the target EMA is exact (weights ∝ τ^γ), so the synthesis error is measured.
    The discrete EMA is ∫ f θ dτ for θ constant on (j−1, j], so per coordinate
    |Σ x_i θ̂_i − θ̂_r| = |∫ (h − g) θ| ≤ ‖h − g‖₂ ‖θ‖₂ (Cauchy–Schwarz), ‖h − g‖₂ = residual · ‖g‖₂.
    Measured (T = 512, σ_rel 0.05 + 0.10 every T/n; error relative to the gap to the σ_rel = 0.10 EMA):
    n = 2, 4, 8, 16, 32 → 0.07: 2.6e-1, 7.3e-2, 7.7e-3, 5.6e-4, 5.0e-5; 0.15: 4.6e-1, 1.4e-1, 2.4e-2, 2.8e-3, 2.5e-4."""
    T = 512
    traj64 = torch.cat([torch.cat(flat(th)).unsqueeze(0) for th in trajectory(T, seed=3)]).double().numpy()
    g_in = [gamma_numpy(s) for s in SIGMA_RELS]
    for target in (0.07, 0.15):
        g_r = gamma_numpy(target)
        exact = exact_power_ema(traj64, T, g_r)
        gap = np.linalg.norm(exact - exact_power_ema(traj64, T, g_in[1]))
        errors = []
        for n in (2, 4, 8, 16, 32):
            inputs = [(T * k // n, g) for k in range(1, n + 1) for g in g_in]
            c = solve_coefficients([t for t, _ in inputs], [g for _, g in inputs], T, g_r)
            synth = sum(x * exact_power_ema(traj64, t, g) for x, (t, g) in zip(c.weights, inputs, strict=True))
            err = np.abs(synth - exact)
            bound = c.residual * math.sqrt(gram_by_integral(T, g_r, T, g_r)) * np.sqrt((traj64[1:] ** 2).sum(0))
            assert (err <= bound * (1 + 1e-9) + 1e-12).all()
            errors.append(np.linalg.norm(err) / gap)
        assert errors[4] < errors[3] < errors[2] < errors[1] < errors[0], errors
        assert errors[4] < 1e-3, errors


def test_a_weight_that_never_moves_is_synthesized_exactly():
    """x is normalised to Σx = 1: with Σx ≠ 1 (a loose fit, here 4 snapshots for σ_rel 0.2) the unnormalised
    sum would scale a constant weight (LoRA A's init, a frozen-in-effect full weight) by Σx."""
    g_in = [gamma_numpy(s) for s in SIGMA_RELS]
    inputs = [(t, g) for t in (64, 128) for g in g_in]
    constant = np.ones((129, 3)) * np.array([0.5, -2.0, 7.0])
    c = solve_coefficients([t for t, _ in inputs], [g for _, g in inputs], 128, gamma_numpy(0.2))
    synth = sum(x * exact_power_ema(constant, t, g) for x, (t, g) in zip(c.weights, inputs, strict=True))
    np.testing.assert_allclose(synth, constant[0], rtol=1e-12)
    assert abs(c.mass - 1) > 1e-2


# ---------------------------------------------------------- (e) the files
WRITER = r"""
import sys, torch
from trl_ema_plugin.posthoc.snapshots import write_snapshot
big = {"w": torch.randn(3_000_000)}
print("ready", flush=True)
i = 0
while True:
    step = 1 + i % 3
    write_snapshot(sys.argv[1], step, 0, step, {0.05: big, 0.1: big}, theta=big)
    i += 1
"""


def test_snapshot_writes_are_atomic_under_a_killed_writer(tmp_path):
    """A real writer process, rewriting three snapshots in a loop, is read while it writes and then killed
    (SIGKILL) mid-write: every file under a final name is complete; partial data only ever has a temp name."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            deadline, seen = time.monotonic() + 1.0, 0
            while time.monotonic() < deadline or not any(n.startswith(".") for n in os.listdir(tmp_path)):
                for path in tmp_path.glob("snapshot-*.safetensors"):
                    try:
                        read_snapshot(path)  # complete whenever it is visible, also while being replaced
                    except FileNotFoundError:
                        continue  # replaced between glob and open
                    seen += 1
        finally:
            proc.send_signal(signal.SIGKILL)  # right after a partial file was seen under a temporary name
            proc.wait()
        assert seen > 0
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # ours, or safetensors' own .tmpXXXX
        for path in tmp_path.glob("snapshot-*.safetensors"):
            read_snapshot(path)
        assert {s.global_step for s in list_snapshots(tmp_path)} <= {1, 2, 3}  # temporary names are not listed
        if partial:
            return
        print(f"attempt {attempt}: the writer finished its file before the kill; again")
    pytest.fail("no kill landed mid-write: the test did not exercise a crash")


def test_reader_rejects_a_truncated_or_foreign_file_naming_it(tmp_path):
    record(tmp_path, trajectory(12), every=4)
    path = snapshot_path(tmp_path, 8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}: not a complete safetensors file \(truncated or corrupt"):
        list_snapshots(tmp_path)
    with pytest.raises(ValueError, match=str(path)):
        synthesize(tmp_path, 0.07)
    path.write_bytes(data[:40])
    with pytest.raises(ValueError, match=str(path)):
        read_snapshot(path)
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    dropped = snapshot_path(tmp_path / "crafted", 8)
    dropped.parent.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("theta/")}, str(dropped), metadata=header)
    with pytest.raises(ValueError, match=rf"{dropped} holds other tensors than its metadata lists"):
        read_snapshot(dropped)
    save_file({k: v.half() for k, v in tensors.items()}, str(dropped), metadata=header)
    with pytest.raises(ValueError, match=r"is F16, the metadata says float32"):
        read_snapshot(dropped)
    os.replace(path, snapshot_path(tmp_path, 9))
    with pytest.raises(ValueError, match=r"holds step 8; its name must be snapshot-00000008.safetensors"):
        list_snapshots(tmp_path)
    foreign = snapshot_path(tmp_path, 9)
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match=rf"{foreign} is not a post-hoc EMA file"):
        read_snapshot(foreign)


def test_synthesis_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no snapshot"):
        synthesize(tmp_path, 0.07)
    record(tmp_path, trajectory(12), every=4)
    with pytest.raises(ValueError, match=r"step=5 is not a snapshot step of .*; allowed values: 4, 8, 12"):
        synthesize(tmp_path, 0.07, step=5)
    with pytest.raises(ValueError, match=r"sigma_rel=0\.5 is out of range"):
        synthesize(tmp_path, 0.5)
    single = tmp_path / "single"
    write_snapshot(single, 4, 0, 4, {0.05: trajectory(1)[1]})
    with pytest.raises(ValueError, match="holds 1 recorded EMA up to step 4; synthesis needs at least 2"):
        synthesize(single, 0.07)
    write_snapshot(single, 9, 9, 0, {0.05: trajectory(1)[1], 0.1: trajectory(1)[1]})
    with pytest.raises(ValueError, match=r"started averaging at step 9, .* at step 0: the folder mixes runs"):
        synthesize(single, 0.07)
    with pytest.raises(
        ValueError, match=r"dtype='float64' is not a snapshot dtype; allowed values: float32, bfloat16, float16"
    ):
        write_snapshot(tmp_path, 20, 0, 20, {0.05: trajectory(1)[1]}, dtype="float64")
    with pytest.raises(ValueError, match=r"'theta' holds other tensors than 'sigma_rel_0.05'"):
        write_snapshot(tmp_path, 20, 0, 20, {0.05: trajectory(1)[1]}, theta={"w": torch.zeros(2)})


def test_run_output_dir_resolves_to_its_posthoc_folder(tmp_path):
    kept = record(tmp_path / "posthoc", trajectory(10), every=5)
    torch.testing.assert_close(synthesize(tmp_path, 0.05)[next(iter(SHAPES))], kept[10][0.05][next(iter(SHAPES))])
