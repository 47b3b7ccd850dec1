"""The YAML keys the plugin adds to Axolotl's config, generated from the pydantic config models.

Axolotl mixes :class:`TrlEmaPluginArgs` into its own config model (``get_input_args`` returns
this dotted path), so ``axolotl train`` validates our keys with the rest of the YAML and rejects
bad values with a message naming the key. The checks that involve Axolotl's own keys (``adapter``,
``rl``, ``precompute_ref_log_probs``, ``trl.sync_ref_model``) live here. No Axolotl import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...config.flat_keys import DPO_REFERENCE, SELF_DISTILLATION, flat_args_model

PEFT_ADAPTERS = ("lora", "qlora")
DPO_RL = ("dpo",)


def check_axolotl_keys(data: Mapping[str, Any]) -> None:
    """Refuse our features together with Axolotl settings they cannot work with (ValueError naming both)."""
    adapter = data.get("adapter")
    if data.get(SELF_DISTILLATION.prefix) and adapter not in PEFT_ADAPTERS:
        raise ValueError(
            f"{SELF_DISTILLATION.prefix}: true needs adapter: {' | '.join(PEFT_ADAPTERS)} (the teacher is a second "
            f"adapter on the same base model); got adapter: {adapter}"
        )
    reference = data.get(DPO_REFERENCE.prefix)
    if reference is None or reference is False:
        return
    rl = data.get("rl")
    rl = getattr(rl, "value", rl)
    if rl not in DPO_RL:
        raise ValueError(f"{DPO_REFERENCE.prefix} moves DPO's reference adapter and needs rl: dpo; got rl: {rl}")
    if adapter not in PEFT_ADAPTERS:
        raise ValueError(
            f"{DPO_REFERENCE.prefix} needs adapter: {' | '.join(PEFT_ADAPTERS)} (the reference is the 'ref' adapter "
            f"on the same base model); got adapter: {adapter}"
        )
    if data.get("precompute_ref_log_probs"):
        raise ValueError(
            f"{DPO_REFERENCE.prefix} moves the reference during training, but precompute_ref_log_probs: true computes "
            "its log-probs once, before training; remove one of them"
        )
    trl = data.get("trl")
    if isinstance(trl, Mapping) and trl.get("sync_ref_model"):
        raise ValueError(
            f"{DPO_REFERENCE.prefix} and trl.sync_ref_model: true both move the reference; for TRL's rule write "
            f"{DPO_REFERENCE.prefix}: tr_dpo with {DPO_REFERENCE.key('ref_model_sync_steps')} and "
            f"{DPO_REFERENCE.key('ref_model_mixup_alpha')}"
        )


TrlEmaPluginArgs = flat_args_model(
    "TrlEmaPluginArgs",
    module=__name__,
    checks=(check_axolotl_keys,),
    doc="Every flat key of every feature, all optional (unset = off / the default).",
)


ARGS_PATH = f"{__name__}.TrlEmaPluginArgs"
