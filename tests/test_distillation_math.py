"""Divergences, temperature, top-k with tail bucket, and the config: against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from trl_ema_plugin.config.distillation import SelfDistillationConfig
from trl_ema_plugin.distillation import (
    distillation_loss,
    generalized_jsd,
    on_top_k_support,
    per_token_distillation,
    teacher_targets,
    tempered_log_probs,
    token_divergence,
)

# two tokens, vocabulary of 3: hand-checkable
STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
TEACHER = torch.tensor([[0.0, 1.0, 0.5], [0.5, 1.0, -2.0]])


def softmax_list(row: list[float], tau: float = 1.0) -> list[float]:
    exps = [math.exp(x / tau) for x in row]
    return [e / sum(exps) for e in exps]


def kl_list(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def hand(divergence: str, tau: float = 1.0, beta: float = 0.5) -> list[float]:
    out = []
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True):
        ps, pt = softmax_list(s_row, tau), softmax_list(t_row, tau)
        if divergence == "forward_kl":
            value = kl_list(pt, ps)
        elif divergence == "reverse_kl":
            value = kl_list(ps, pt)
        else:
            m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt, strict=True)]
            value = beta * kl_list(pt, m) + (1 - beta) * kl_list(ps, m)
        out.append(tau**2 * value)
    return out


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_per_token_divergence_matches_hand_formula(divergence, tau):
    targets = teacher_targets(TEACHER, tau)
    beta = 0.3 if divergence == "generalized_jsd" else None
    got = per_token_distillation(STUDENT, targets, divergence=divergence, beta=beta, temperature=tau)
    expected = hand(divergence, tau, beta=0.3)
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_jsd_endpoints_are_the_kls_as_in_trl():
    s, t = tempered_log_probs(STUDENT), tempered_log_probs(TEACHER)
    assert torch.equal(generalized_jsd(s, t, 0.0), token_divergence(s, t, "forward_kl"))
    assert torch.equal(generalized_jsd(s, t, 1.0), token_divergence(s, t, "reverse_kl"))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match=r"divergence='kl'.*forward_kl, reverse_kl, generalized_jsd"):
        token_divergence(s, t, "kl")


def test_generalized_jsd_equals_trl_gkd():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [4, -100, 5, 6, 7]])
    for beta in (0.0, 0.4, 1.0):
        ours = distillation_loss(
            student, teacher, labels != -100, divergence="generalized_jsd", beta=beta, temperature=1.7
        )
        theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=1.7)
        # TRL leaves out the τ² factor
        assert ours.item() == pytest.approx(1.7**2 * theirs.item(), rel=1e-5)


def test_identical_logits_give_exactly_zero():
    logits = torch.randn(4, 7, 50)
    for divergence in ("forward_kl", "reverse_kl"):
        assert distillation_loss(logits, logits.clone(), divergence=divergence, temperature=1.3).item() == 0.0
    assert abs(distillation_loss(logits, logits.clone(), divergence="generalized_jsd", beta=0.3).item()) < 1e-6


def test_forward_kl_gradient_is_tau_times_probability_gap():
    # d/dz_S [τ² KL(p_T ‖ p_S)] = τ (p_S − p_T), averaged over tokens
    tau = 2.0
    student = STUDENT.clone().requires_grad_(True)
    distillation_loss(student, TEACHER, temperature=tau).backward()
    expected = tau * (torch.softmax(STUDENT / tau, -1) - torch.softmax(TEACHER / tau, -1)) / STUDENT.size(0)
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_mask_selects_tokens_and_empty_mask_is_a_connected_zero():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    full = per_token_distillation(student.reshape(-1, 5), teacher_targets(teacher.reshape(-1, 5)))
    expected = full[mask.reshape(-1)].mean()
    assert distillation_loss(student, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    leaf = student.clone().requires_grad_(True)
    zero = distillation_loss(leaf, teacher, torch.zeros(2, 3, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(leaf))
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(student, teacher, mask[:, :2])


def test_top_k_support_and_tail_bucket_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    targets = teacher_targets(logits, top_k=2)
    p = softmax_list(logits[0].tolist())
    assert targets.indices.tolist() == [[0, 2]]
    expected = [math.log(p[0]), math.log(p[2]), math.log(p[1] + p[3])]
    assert targets.log_probs[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert targets.log_probs.exp().sum().item() == pytest.approx(1.0, rel=1e-6)
    # the student is read on the teacher's support
    student = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    q = softmax_list(student[0].tolist())
    got = per_token_distillation(student, targets).item()
    coarse_p, coarse_q = [p[0], p[2], p[1] + p[3]], [q[0], q[2], q[1] + q[3]]
    assert got == pytest.approx(kl_list(coarse_p, coarse_q), rel=1e-5)
    # coarsening never increases the divergence; k >= V is the full vocabulary
    assert got <= per_token_distillation(student, teacher_targets(logits)).item()
    assert torch.equal(teacher_targets(logits, top_k=4).log_probs, tempered_log_probs(logits))


def test_top_k_tail_stays_finite_with_masked_vocabulary():
    logits = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")]])
    log_probs = tempered_log_probs(logits)
    support = on_top_k_support(log_probs, torch.tensor([[1, 0]]))
    assert support[0, 2].item() == float("-inf")
    value = per_token_distillation(torch.tensor([[0.5, 0.0, 0.0, 0.0]]), teacher_targets(logits, top_k=2))
    assert torch.isfinite(value).all()


# ------------------------------------------------------------------------------- config
def test_config_defaults_and_aliases():
    config = SelfDistillationConfig()
    assert (config.divergence, config.jsd_beta, config.temperature, config.lambda_) == ("forward_kl", 0.0, 1.0, 0.5)
    assert SelfDistillationConfig(weight=0.2).lambda_ == 0.2
    assert SelfDistillationConfig(divergence="generalized_jsd").jsd_beta == 0.5
    assert SelfDistillationConfig(divergence="reverse_kl").jsd_beta == 1.0
    for field in SelfDistillationConfig.model_fields.values():
        assert field.description, "every field documents itself (the Axolotl keys are generated from them)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_": -0.1}, "lambda_"),
        ({"weight": -1.0}, "lambda_"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"divergence": "kl"}, "(?s)divergence.*'forward_kl', 'reverse_kl' or 'generalized_jsd'"),
        ({"beta": 0.5}, "beta=0.5: applies only to divergence='generalized_jsd'"),
        ({"divergence": "generalized_jsd", "beta": 1.5}, "beta"),
        ({"top_k": 0}, "top_k"),
        ({"distill_every": 0}, "distill_every"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"lambda_": 0.1, "weight": 0.2}, "lambda_ or its alias weight"),
        ({"adapter_name": "default"}, "adapter_name"),
        ({"tau": 2.0}, "tau"),
    ],
)
def test_bad_options_fail_with_the_key_name(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        SelfDistillationConfig(**kwargs)
    assert isinstance(info.value, ValidationError)


def test_distillation_schedule():
    config = SelfDistillationConfig(warmup_steps=2, distill_every=3)
    assert [t for t in range(10) if config.distills_at(t)] == [2, 5, 8]
