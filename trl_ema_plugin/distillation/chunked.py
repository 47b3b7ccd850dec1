r"""``Σ_tokens τ² · D(student ‖ teacher)`` in chunks of tokens, with the student's gradient computed chunk by chunk.

The full-vocabulary tensors of a distillation term (student logits, both tempered log-probabilities, the
divergence's intermediates and their gradients) are ``[N, V]`` each: several GiB for a few thousand tokens
of a 32 k vocabulary. Here they exist for ``chunk`` tokens at a time. Each chunk's gradient with respect to
the student's *input* (the hidden states that the LM head projects, or the logits themselves) is computed in
the forward pass, as Liger kernel's fused linear losses do, and kept until the backward (``[N, D]``); so the
backward costs no recomputation and the peak memory holds one chunk's vocabulary tensors.

Per token the values are those of :func:`.divergences.per_token_distillation` (the same functions run on
each chunk); only the order of the sum over tokens differs (fp32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .divergences import per_token_distillation, teacher_targets

#: elements of one ``[chunk, V]`` tensor: 32 MiB in fp32 (262 tokens of a 32 k vocabulary)
CHUNK_ELEMENTS = 1 << 23


def chunk_tokens(vocabulary: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one ``[chunk, V]`` tensor holds at most ``elements`` (at least one token)."""
    return max(1, elements // max(vocabulary, 1))


@dataclass(frozen=True)
class ChunkedTerm:
    """How to compute the term: the heads, the divergence and the chunk size.

    ``student_head`` maps student input rows ``[C, D]`` to logits ``[C, V]`` (None: the rows are the logits);
    ``teacher_logits(lo, hi)`` gives the teacher's logits of tokens ``lo..hi`` (no gradient needed).
    """

    student_head: Callable[[Tensor], Tensor] | None
    teacher_logits: Callable[[int, int], Tensor]
    divergence: str = "forward_kl"
    beta: float | None = None
    temperature: float = 1.0
    top_k: int | None = None
    chunk: int = 256


class _ChunkedDistillation(torch.autograd.Function):
    """Forward: the term's sum, and its gradient with respect to the selected rows of ``source``, chunk by chunk.
    Backward: that gradient, scaled by the incoming one, scattered back into ``source``'s shape."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor, term: ChunkedTerm) -> Tensor:  # type: ignore[override]
        rows = source.detach().reshape(-1, source.size(-1))
        wants_grad = bool(ctx.needs_input_grad[0])
        grad = rows.new_empty((index.numel(), rows.size(1))) if wants_grad else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for lo in range(0, index.numel(), term.chunk):
            hi = min(lo + term.chunk, index.numel())
            student = rows.index_select(0, index[lo:hi]).requires_grad_(wants_grad)
            with torch.no_grad():
                targets = teacher_targets(term.teacher_logits(lo, hi), term.temperature, term.top_k)
            with torch.enable_grad():
                logits = term.student_head(student) if term.student_head is not None else student
                part = per_token_distillation(
                    logits, targets, divergence=term.divergence, beta=term.beta, temperature=term.temperature
                ).sum()
            if grad is not None:
                (grad[lo:hi],) = torch.autograd.grad(part, student)
            total += part.detach().float()
            del targets, logits, part, student
        ctx.save_for_backward(index, grad)
        ctx.source_shape = source.shape
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        index, grad = ctx.saved_tensors
        if grad is None:
            return None, None, None
        full = grad.new_zeros((math.prod(ctx.source_shape[:-1]), grad.size(1)))
        full.index_copy_(0, index, grad * grad_output.to(grad.dtype))
        return full.view(ctx.source_shape), None, None


def chunked_distillation_sum(source: Tensor, index: Tensor, term: ChunkedTerm) -> Tensor:
    """``Σ τ² · D`` over the rows ``index`` of ``source.reshape(-1, D)`` (hidden states, or logits when
    ``term.student_head`` is None), differentiable with respect to ``source``; token ``i`` is ``index[i]``."""
    if index.numel() == 0:
        return source.sum() * 0.0  # a zero that is still connected to the student
    return _ChunkedDistillation.apply(source, index, term)
