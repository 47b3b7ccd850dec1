"""Self-distillation from an averaged (EMA/BEMA) teacher: the divergences, as pure functions."""

from .chunked import CHUNK_ELEMENTS, ChunkedTerm, chunk_tokens, chunked_distillation_sum
from .divergences import (
    TeacherTargets,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    kl,
    on_top_k_support,
    per_token_distillation,
    reverse_kl,
    student_log_probs_on,
    teacher_targets,
    tempered_log_probs,
    token_divergence,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "ChunkedTerm",
    "TeacherTargets",
    "chunk_tokens",
    "chunked_distillation_sum",
    "distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "kl",
    "on_top_k_support",
    "per_token_distillation",
    "reverse_kl",
    "student_log_probs_on",
    "teacher_targets",
    "tempered_log_probs",
    "token_divergence",
]
