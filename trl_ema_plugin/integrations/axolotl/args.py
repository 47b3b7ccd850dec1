"""The YAML keys the plugin adds to Axolotl's config, generated from the pydantic config models.

Axolotl mixes :class:`TrlEmaPluginArgs` into its own config model (``get_input_args`` returns
this dotted path), so ``axolotl train`` validates our keys with the rest of the YAML and rejects
bad values with a message naming the key. The checks that involve Axolotl's own keys (``adapter``,
``rl``, ``precompute_ref_log_probs``, ``trl.sync_ref_model``) live here. No Axolotl import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...config.errors import SettingError
from ...config.flat_keys import DPO_REFERENCE, SELF_DISTILLATION, flat_args_model

PEFT_ADAPTERS = ("lora", "qlora")
DPO_RL = ("dpo",)


def check_axolotl_keys(data: Mapping[str, Any]) -> None:
    """Refuse our features together with Axolotl settings they cannot work with (ValueError naming both)."""
    adapter = data.get("adapter")
    distillation = data.get(SELF_DISTILLATION.prefix)
    if distillation and adapter not in PEFT_ADAPTERS:
        raise SettingError(
            f"needs a PEFT adapter (the teacher is a second adapter on the same base model); got adapter: {adapter}",
            field=SELF_DISTILLATION.prefix,
            value=distillation,
            allowed=f"with adapter: {' | '.join(PEFT_ADAPTERS)}",
        )
    reference = data.get(DPO_REFERENCE.prefix)
    if reference is None or reference is False:
        return
    rl = data.get("rl")
    rl = getattr(rl, "value", rl)
    if rl not in DPO_RL:
        raise SettingError(
            f"moves DPO's reference adapter and needs rl: dpo; got rl: {rl}",
            field=DPO_REFERENCE.prefix,
            value=reference,
            allowed=f"with rl: {' | '.join(DPO_RL)}",
        )
    if adapter not in PEFT_ADAPTERS:
        raise SettingError(
            f"needs a PEFT adapter (the reference is the 'ref' adapter on the same base model); got adapter: {adapter}",
            field=DPO_REFERENCE.prefix,
            value=reference,
            allowed=f"with adapter: {' | '.join(PEFT_ADAPTERS)}",
        )
    if data.get("precompute_ref_log_probs"):
        raise SettingError(
            "moves the reference during training, but precompute_ref_log_probs: true computes its log-probs once, "
            "before training; remove one of them",
            settings={DPO_REFERENCE.prefix: reference, "precompute_ref_log_probs": True},
            allowed="precompute_ref_log_probs: false",
        )
    trl = data.get("trl")
    if isinstance(trl, Mapping) and trl.get("sync_ref_model"):
        raise SettingError(
            f"{DPO_REFERENCE.prefix} and trl.sync_ref_model both move the reference",
            settings={DPO_REFERENCE.prefix: reference, "trl.sync_ref_model": trl.get("sync_ref_model")},
            allowed=f"for TRL's rule {DPO_REFERENCE.prefix}: tr_dpo with {DPO_REFERENCE.key('ref_model_sync_steps')} "
            f"and {DPO_REFERENCE.key('ref_model_mixup_alpha')}, without trl.sync_ref_model",
        )


TrlEmaPluginArgs = flat_args_model(
    "TrlEmaPluginArgs",
    module=__name__,
    checks=(check_axolotl_keys,),
    doc="Every flat key of every feature, all optional (unset = off / the default).",
)


ARGS_PATH = f"{__name__}.TrlEmaPluginArgs"
