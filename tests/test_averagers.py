"""Averager math against hand computations from recorded weights (non-default hyper-parameters)."""

from __future__ import annotations

import oracles
import pytest
import torch

from trl_ema_plugin import AveragerSpec
from trl_ema_plugin.averagers import BEMA, DEMA, EMA, OUEMA, register_averager, registered_methods
from trl_ema_plugin.averagers.schedules import BEMASchedule


def trajectory(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Random-walk weights θ_0..θ_steps for two tensors of different sizes."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    out = [[t.clone() for t in theta]]
    for _ in range(steps):
        theta = [t + 0.1 * torch.randn(t.shape, generator=g) for t in theta]
        out.append([t.clone() for t in theta])
    return out


def run(averager, traj, update_after: int, every: int):
    """Drive an averager with the cadence of AveragerSpec; return its output after the last step."""
    flat = [[t.reshape(-1) for t in step] for step in traj]
    averager.allocate([t.numel() for t in flat[0]], "cpu")
    spec = AveragerSpec(method="ema", update_after=update_after, update_every=every)
    for t, theta in enumerate(flat):
        if t == update_after:
            averager.start(theta, t)
        elif averager.started and spec.is_update_step(t):
            averager.update(theta, t)
    out = [torch.empty_like(x) for x in flat[-1]]
    averager.average_into(out, flat[-1], len(flat) - 1)
    return torch.cat(out)


def flat(step):
    return torch.cat([t.reshape(-1) for t in step]).double()


def hand(method: str, traj, **settings) -> torch.Tensor:
    """The float64 oracle of ``method`` after the last step, flattened like :func:`run`'s output."""
    return flat(oracles.averaged(dict(enumerate(traj)), {"method": method, **settings}))


def test_ema_fixed_decay_matches_hand():
    traj = trajectory(9)
    got = run(EMA(decay=0.7), traj, update_after=2, every=3)
    expected = hand("ema", traj, decay=0.7, update_after=2, update_every=3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_ema_warmup_follows_diffusers_schedule():
    traj = trajectory(6)
    got = run(EMA(decay=0.99, use_ema_warmup=True, inv_gamma=2.0, power=0.5), traj, update_after=1, every=1)
    expected = hand("ema", traj, decay=0.99, use_ema_warmup=True, inv_gamma=2.0, power=0.5, update_after=1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_bema_matches_paper_formula(every):
    lag, mult, kappa, eta, tau = 3.0, 0.5, 0.4, 0.3, 2
    traj = trajectory(8)
    got = run(
        BEMA(ema_power=kappa, bias_power=eta, lag=lag, multiplier=mult, keep_last_weights=every > 1), traj, tau, every
    )
    expected = hand(
        "bema", traj, update_after=tau, update_every=every, lag=lag, multiplier=mult, ema_power=kappa, bias_power=eta
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_bema_min_ema_multiplier_floors_beta():
    traj = trajectory(4)
    got = run(BEMA(ema_power=3.0, bias_power=0.5, lag=2, min_ema_multiplier=0.25), traj, 0, 1)
    expected = hand("bema", traj, ema_power=3.0, bias_power=0.5, lag=2, min_ema_multiplier=0.25)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("at", [5, 8, 12])  # before, at and after the horizon H = 8
def test_bema_bias_horizon_fades_alpha_to_zero(at):
    traj = trajectory(at + 1)
    got = run(BEMA(bias_power=0.3, lag=2, bias_horizon=8), traj, 0, 1)
    expected = hand("bema", traj, bias_power=0.3, lag=2, bias_horizon=8)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    if at >= 8:  # α_t = 0 from H on: θ̂_t is the EMA alone
        ema_only = hand("bema", traj, bias_power=0.3, lag=2, bias_horizon=1e-9)
        torch.testing.assert_close(got.double(), ema_only, rtol=1e-6, atol=1e-6)


def test_dema_is_two_ema_minus_ema_of_ema():
    traj = trajectory(7)
    got = run(DEMA(ema_power=0.6, lag=2, multiplier=2.0), traj, 1, 2)
    expected = hand("dema", traj, ema_power=0.6, lag=2, multiplier=2.0, update_after=1, update_every=2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_ouema_is_ema_of_debiased_weights():
    traj = trajectory(5)
    got = run(OUEMA(ema_power=0.5, bias_power=0.3, lag=4), traj, 0, 1)
    expected = hand("ouema", traj, ema_power=0.5, bias_power=0.3, lag=4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_ouema_guards_alpha_one():
    """lag=0 at t=0 gives α=1: the authors' code divides by zero; we fall back to θ_t."""
    averager = OUEMA(lag=0)
    theta = [torch.ones(3)]
    averager.allocate([3], "cpu")
    averager.start(theta, 0)
    averager.update([torch.full((3,), 2.0)], 0)
    out = [torch.empty(3)]
    averager.average_into(out, theta, 0)
    assert torch.isfinite(out[0]).all()


def test_bema_between_sparse_updates_uses_weights_of_last_update():
    averager = BEMA(lag=1, keep_last_weights=True)
    averager.allocate([2], "cpu")
    averager.start([torch.zeros(2)], 0)
    averager.update([torch.ones(2)], 2)
    out_at_update, out_later = [torch.empty(2)], [torch.empty(2)]
    averager.average_into(out_at_update, [torch.ones(2)], 2)
    averager.average_into(out_later, [torch.full((2,), 9.0)], 3)
    torch.testing.assert_close(out_at_update[0], out_later[0])


def test_bema_without_last_weights_refuses_stale_output():
    averager = BEMA()
    averager.allocate([2], "cpu")
    averager.start([torch.zeros(2)], 0)
    with pytest.raises(RuntimeError, match="keep_last_weights"):
        averager.average_into([torch.empty(2)], [torch.ones(2)], 5)


def test_buffers_stay_fp32_with_bf16_weights():
    from trl_ema_plugin.shadow import AveragedWeights, LocalLayout

    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    store = AveragedWeights(AveragerSpec(method="bema", update_every=1), LocalLayout([("w", p)]))
    store.step(0)
    with torch.no_grad():
        p.add_(1.0)
    store.step(1)
    assert all(b.dtype == torch.float32 for b in store.averager.buffers.values())
    assert store.averaged_tensors(1)["w"].dtype == torch.float32


# ------------------------------------------------------------------------ what an averager declares
def test_each_averager_declares_its_settings_and_refuses_others():
    assert EMA.hyperparameters == ("decay", "use_ema_warmup", "inv_gamma", "power")
    assert (
        BEMA.hyperparameters
        == OUEMA.hyperparameters
        == ("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier", "bias_horizon")
    )
    assert DEMA.hyperparameters == ("ema_power", "lag", "multiplier", "min_ema_multiplier")  # no α_t, no η
    assert BEMA.output_reads_last_update and not DEMA.output_reads_last_update
    with pytest.raises(
        TypeError, match=r"DEMA\(\) got unexpected keyword argument\(s\) bias_power; its hyper-parameters"
    ):
        DEMA(bias_power=0.2)
    with pytest.raises(TypeError, match="keep_last_weights"):
        OUEMA(keep_last_weights=True)  # a BEMA construction argument, not an OUEMA one
    assert BEMA(lag=3, multiplier=0.5).schedule == BEMASchedule(lag=3, multiplier=0.5)


def test_bema_schedule_is_the_paper_formula():
    schedule = BEMASchedule(ema_power=0.4, bias_power=0.3, lag=3.0, multiplier=0.5, min_ema_multiplier=0.1)
    for t in (0, 1, 7, 100):
        assert schedule.beta(t) == max((3.0 + 0.5 * t) ** -0.4, 0.1)
        assert schedule.alpha(t) == (3.0 + 0.5 * t) ** -0.3
    assert BEMASchedule(lag=0).alpha(0) == 1.0  # ρ + γt clamped at 1


def test_registering_needs_a_declaration_that_the_constructor_takes():
    undeclared = type("Undeclared", (BEMA,), {"hyperparameters": None})  # as a class that declares nothing
    with pytest.raises(ValueError, match="Undeclared declares no hyperparameters: add the class attribute"):
        register_averager("undeclared")(undeclared)

    class Misdeclared(EMA):
        hyperparameters = ("decay", "momentum")

        def __init__(self, decay: float = 0.9) -> None:
            super().__init__(decay=decay)

    with pytest.raises(
        ValueError, match="Misdeclared declares hyperparameters its constructor does not take: momentum"
    ):
        register_averager("misdeclared")(Misdeclared)
    assert "undeclared" not in registered_methods() and "misdeclared" not in registered_methods()
