"""The moving reference's config under its former module name: everything moved to :mod:`.reference`.

Kept so that ``from trl_ema_plugin.config.dpo_reference import DPOReferenceConfig`` keeps working.
"""

from __future__ import annotations

from .reference import (
    REFERENCE_NAME,
    TR_DPO,
    TRL_REF_MODEL_MIXUP_ALPHA,
    TRL_REF_MODEL_SYNC_STEPS,
    DPOReferenceConfig,
    ReferenceConfig,
    reference_methods,
)

__all__ = [
    "REFERENCE_NAME",
    "TRL_REF_MODEL_MIXUP_ALPHA",
    "TRL_REF_MODEL_SYNC_STEPS",
    "TR_DPO",
    "DPOReferenceConfig",
    "ReferenceConfig",
    "reference_methods",
]
