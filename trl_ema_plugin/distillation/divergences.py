r"""Token-level divergences between a student and a teacher next-token distribution.

Pure functions on logits (``[..., V]``) and masks; no model, no trainer. With
``p_S = softmax(z_S / τ)`` and ``p_T = softmax(z_T / τ)`` per token:

* forward KL  ``KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)``  (the teacher is the target);
* reverse KL  ``KL(p_S ‖ p_T)``;
* generalized JSD (TRL ``GKDTrainer.generalized_jsd_loss``, GKD paper eq. 1), with
  ``m = (1 − β) p_S + β p_T``:  ``β · KL(p_T ‖ m) + (1 − β) · KL(p_S ‖ m)``; as in TRL,
  β = 0 is the forward KL and β = 1 the reverse KL.

The loss is ``τ² · mean_tokens D`` (Hinton et al.: τ² keeps the gradient scale independent of τ).

Top-k: the teacher's k most likely tokens plus one *tail* bucket holding the rest of the mass
(``log Σ_{v ∉ top-k} p_v``), so both distributions live on k + 1 outcomes and the teacher side
needs ``O(k)`` memory per token instead of ``O(V)``. The divergence on the coarsened
distributions is a lower bound of the full one (data processing inequality).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.distillation import DIVERGENCES


def _finite(log_p: Tensor) -> Tensor:
    """Replace −inf by the most negative finite value, so that 0 · (−inf) never makes a NaN."""
    return log_p.clamp(min=torch.finfo(log_p.dtype).min)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` over the last dimension, from log-probabilities."""
    log_p, log_q = _finite(log_p), _finite(log_q)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """``KL(p_T ‖ p_S)`` per token."""
    return kl(teacher_log_probs, student_log_probs)


def reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """``KL(p_S ‖ p_T)`` per token."""
    return kl(student_log_probs, teacher_log_probs)


def generalized_jsd(student_log_probs: Tensor, teacher_log_probs: Tensor, beta: float) -> Tensor:
    """``β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m)``, ``m = (1 − β) p_S + β p_T``; β ∈ {0, 1}: forward / reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if beta == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    mixture = torch.logsumexp(
        torch.stack([student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta)]), dim=0
    )
    return beta * kl(teacher_log_probs, mixture) + (1.0 - beta) * kl(student_log_probs, mixture)


def token_divergence(
    student_log_probs: Tensor, teacher_log_probs: Tensor, divergence: str, beta: float | None = None
) -> Tensor:
    """The divergence named ``divergence`` per token (log-probabilities on the same support)."""
    if divergence == "forward_kl":
        return forward_kl(student_log_probs, teacher_log_probs)
    if divergence == "reverse_kl":
        return reverse_kl(student_log_probs, teacher_log_probs)
    if divergence == "generalized_jsd":
        return generalized_jsd(student_log_probs, teacher_log_probs, 0.5 if beta is None else beta)
    raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")


# ------------------------------------------------------------------------------------ supports
@dataclass
class TeacherTargets:
    """The teacher's tempered log-probabilities on its support: the vocabulary, or top-k + tail."""

    log_probs: Tensor  # [N, V], or [N, k + 1] with the tail bucket last
    indices: Tensor | None = None  # [N, k] token ids of the top-k support; None for the full vocabulary


def tempered_log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / τ)`` in fp32."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    return F.log_softmax(logits.float() / temperature, dim=-1)


def on_top_k_support(log_probs: Tensor, indices: Tensor) -> Tensor:
    """Log-probabilities of ``indices`` followed by the tail bucket ``log Σ_{v ∉ indices} p_v``: ``[N, k + 1]``."""
    top = log_probs.gather(-1, indices)
    rest = log_probs.scatter(-1, indices, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def teacher_targets(teacher_logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> TeacherTargets:
    """Tempered teacher log-probabilities, reduced to top-k + tail when ``top_k < V``."""
    log_probs = tempered_log_probs(teacher_logits, temperature)
    if top_k is None or top_k >= log_probs.size(-1):
        return TeacherTargets(log_probs)
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    indices = log_probs.topk(top_k, dim=-1).indices
    return TeacherTargets(on_top_k_support(log_probs, indices), indices)


def student_log_probs_on(student_logits: Tensor, targets: TeacherTargets, temperature: float = 1.0) -> Tensor:
    """Tempered student log-probabilities on the teacher's support."""
    log_probs = tempered_log_probs(student_logits, temperature)
    return log_probs if targets.indices is None else on_top_k_support(log_probs, targets.indices)


# --------------------------------------------------------------------------------------- losses
def per_token_distillation(
    student_logits: Tensor,
    targets: TeacherTargets,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """``τ² · D(student ‖ teacher)`` for each row of ``student_logits`` (``[N, V]`` → ``[N]``)."""
    student = student_log_probs_on(student_logits, targets, temperature)
    return temperature**2 * token_divergence(student, targets.log_probs, divergence, beta)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """``τ² · mean_{tokens in mask} D(student ‖ teacher)``; logits ``[..., V]``, ``mask`` of shape ``[...]``.

    An empty mask gives a zero that is still connected to ``student_logits``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the logits {tuple(student_logits.shape[:-1])}")
        mask = mask.bool()
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    student_logits = student_logits.reshape(-1, student_logits.size(-1))
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.size(-1))
    targets = teacher_targets(teacher_logits.detach(), temperature, top_k)
    per_token = per_token_distillation(
        student_logits, targets, divergence=divergence, beta=beta, temperature=temperature
    )
    return per_token.sum() / max(per_token.numel(), 1)
