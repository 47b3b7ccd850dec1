"""Optional: the self-distillation term through Liger kernel's fused linear JSD (``kernel="liger"``).

Liger kernel (PyPI ``liger-kernel``, Triton, CUDA only) projects the student's and the teacher's hidden states
through the LM head in chunks and computes the generalized JSD and its gradient without the full logits, as
:func:`~trl_ema_plugin.distillation.chunked_distillation_sum` does in PyTorch. Its JSD is ours: with student Q,
teacher P and M = β·P + (1 − β)·Q, ``β·KL(P‖M) + (1 − β)·KL(Q‖M)`` (β = 0 forward KL, β = 1 reverse KL, since
0.5.0), on logits divided by τ, averaged over the tokens: the term is that mean · N · τ².

Not a dependency of this package; ``kernel="liger"`` is refused at train begin where it cannot run.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from packaging.version import Version
from torch import Tensor, nn

from .student_outputs import logit_multiplier

#: the first release whose JSD has β = 0 and β = 1 (forward and reverse KL); before, β must lie in (0, 1)
MIN_LIGER_VERSION = "0.5.0"


def liger_unavailable(causal_lm: nn.Module, plain_head: bool) -> str | None:
    """Why Liger's fused linear JSD cannot compute the term for ``causal_lm``, or None when it can."""
    try:
        installed = version("liger-kernel")
    except PackageNotFoundError:
        return f"liger-kernel is not installed (pip install 'liger-kernel>={MIN_LIGER_VERSION}')"
    if Version(installed) < Version(MIN_LIGER_VERSION):
        return f"liger-kernel {installed} is installed; its JSD needs >= {MIN_LIGER_VERSION} for beta 0 and 1"
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return f"the output layer is a {type(head).__name__}, not a bias-free nn.Linear"
    if hasattr(head.weight, "ds_tensor"):
        return "the output layer is partitioned by DeepSpeed ZeRO-3"
    if not torch.cuda.is_available() or head.weight.device.type != "cuda":
        return "it needs the output layer on a CUDA device (Triton kernels)"
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    if logit_multiplier(config) is not None or getattr(config, "final_logit_softcapping", None):
        return "the model scales or soft-caps its logits, which the kernel does not"
    if not plain_head:
        return "the output layer is trained or carries an adapter"
    return None


def liger_distillation_sum(
    causal_lm: nn.Module, hidden: Tensor, positions: Tensor, teacher_rows: Tensor, config: Any
) -> tuple[Tensor, int]:
    """``Σ τ² · D`` over the completion ``positions`` of the student's ``hidden`` states, and their number."""
    from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction

    student_rows = hidden[positions]
    count = student_rows.size(0)
    if count == 0:
        return hidden.sum() * 0.0, 0
    weight = causal_lm.get_output_embeddings().weight
    mean = LigerFusedLinearJSDFunction.apply(
        student_rows, weight, teacher_rows.to(student_rows.dtype), weight, None, config.jsd_beta, -100,
        config.temperature,
    )  # fmt: skip
    return mean * (count * config.temperature**2), count
