"""The moving reference's former module name: everything moved to :mod:`~trl_ema_plugin.integrations.trl.reference`.

Kept so that ``from trl_ema_plugin.integrations.trl.dpo_reference import AveragedReferenceCallback`` (and
``add_reference_adapter``, ``REFERENCE_FOLDER``) keeps working; the callback serves DPO, KTO, GRPO and RLOO.
"""

from __future__ import annotations

from .reference import (
    LEGACY_REFERENCE_FOLDERS,
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    REFERENCE_FOLDER,
    AveragedReferenceCallback,
    add_reference_adapter,
    check_arguments,
    require_peft_model,
)

__all__ = [
    "LEGACY_REFERENCE_FOLDERS",
    "POLICY_ADAPTER",
    "REFERENCE_ADAPTER",
    "REFERENCE_FOLDER",
    "AveragedReferenceCallback",
    "add_reference_adapter",
    "check_arguments",
    "require_peft_model",
]
