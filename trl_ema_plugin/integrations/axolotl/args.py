"""The YAML keys the plugin adds to Axolotl's config, generated from the pydantic config models.

Axolotl mixes :class:`TrlEmaPluginArgs` into its own config model (``get_input_args`` returns
this dotted path), so ``axolotl train`` validates our keys with the rest of the YAML and rejects
bad values with a message naming the key. The checks that involve Axolotl's own keys (``adapter``,
``rl``, ``precompute_ref_log_probs``, ``rl_adapter_ref_model``, ``trl.beta``, ``trl.sync_ref_model``,
``trl.async_prefetch``) live here. No Axolotl import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...config.errors import NO_VALUE, SettingError
from ...config.flat_keys import RL_REFERENCE, SELF_DISTILLATION, flat_args_model, switch_setting

PEFT_ADAPTERS = ("lora", "qlora")
#: Axolotl ``rl:`` values whose trainer reads the "ref" adapter (IPO runs DPOTrainer, GDPO GRPOTrainer)
REFERENCE_RL = ("dpo", "ipo", "kto", "grpo", "gdpo")
#: those that read it once per generation batch, and only with a KL term (beta > 0)
GENERATION_RL = ("grpo", "gdpo")
#: self-distillation: SFT (no rl) and these
DISTILLATION_RL = ("dpo", "ipo", "grpo", "gdpo")
#: Axolotl's asynchronous GRPO trainer (``trl.async_prefetch`` / ``trl.use_data_producer``)
ASYNC_GRPO_KEYS = ("async_prefetch", "use_data_producer")


def _rl(data: Mapping[str, Any]) -> Any:
    rl = data.get("rl")
    return getattr(rl, "value", rl)


def _trl(data: Mapping[str, Any]) -> Mapping[str, Any]:
    trl = data.get("trl")
    return trl if isinstance(trl, Mapping) else {}


def check_axolotl_keys(data: Mapping[str, Any]) -> None:
    """Refuse our features together with Axolotl settings they cannot work with (ValueError naming both)."""
    check_self_distillation(data)
    switched = switch_setting(RL_REFERENCE, data)
    if switched is not None:
        check_reference(data, *switched)


def check_self_distillation(data: Mapping[str, Any]) -> None:
    distillation = data.get(SELF_DISTILLATION.prefix)
    if not distillation:
        return
    adapter = data.get("adapter")
    if adapter not in PEFT_ADAPTERS:
        raise SettingError(
            f"needs a PEFT adapter (the teacher is a second adapter on the same base model); got adapter: {adapter}",
            field=SELF_DISTILLATION.prefix,
            value=distillation,
            allowed=f"with adapter: {' | '.join(PEFT_ADAPTERS)}",
        )
    rl = _rl(data)
    if rl is not None and rl not in DISTILLATION_RL:
        reason = " (KTO batches mix desirable and undesirable completions)" if rl == "kto" else ""
        raise SettingError(
            f"distils on SFT and rl: {' | '.join(DISTILLATION_RL)} runs, not on rl: {rl}{reason}",
            field=SELF_DISTILLATION.prefix,
            value=distillation,
            allowed=f"without rl:, or with rl: {' | '.join(DISTILLATION_RL)}",
        )


def check_reference(data: Mapping[str, Any], key: str, reference: Any) -> None:
    """The moving reference (``key`` as the user wrote it: ``rl_reference`` or ``dpo_reference``) and Axolotl's keys."""
    names = RL_REFERENCE.spelling([key])
    rl, adapter, trl = _rl(data), data.get("adapter"), _trl(data)
    if rl not in REFERENCE_RL:
        raise SettingError(
            f"moves the reference adapter of an RLHF trainer and needs rl: {' | '.join(REFERENCE_RL)}; got rl: {rl}",
            field=key,
            value=reference,
            allowed=f"with rl: {' | '.join(REFERENCE_RL)}",
        )
    if adapter not in PEFT_ADAPTERS:
        raise SettingError(
            f"needs a PEFT adapter (the reference is the 'ref' adapter on the same base model); got adapter: {adapter}",
            field=key,
            value=reference,
            allowed=f"with adapter: {' | '.join(PEFT_ADAPTERS)}",
        )
    if data.get("rl_adapter_ref_model"):
        raise SettingError(
            "moves the 'ref' adapter, but rl_adapter_ref_model: true loads a separate reference model, which the "
            "trainer would read instead; remove one of them",
            settings={key: reference, "rl_adapter_ref_model": True},
            allowed="rl_adapter_ref_model: false",
        )
    if data.get("precompute_ref_log_probs"):
        raise SettingError(
            "moves the reference during training, but precompute_ref_log_probs: true computes its log-probs once, "
            "before training; remove one of them",
            settings={key: reference, "precompute_ref_log_probs": True},
            allowed="precompute_ref_log_probs: false",
        )
    if trl.get("sync_ref_model"):
        raise SettingError(
            f"{key} and trl.sync_ref_model both move the reference",
            settings={key: reference, "trl.sync_ref_model": trl.get("sync_ref_model")},
            allowed=f"for TRL's rule {key}: tr_dpo with {names['ref_model_sync_steps']} "
            f"and {names['ref_model_mixup_alpha']}, without trl.sync_ref_model",
        )
    if rl in GENERATION_RL:
        check_generation_reference(data, key, reference, rl, trl)


def check_generation_reference(
    data: Mapping[str, Any], key: str, reference: Any, rl: str, trl: Mapping[str, Any]
) -> None:
    """GRPO/GDPO: a KL term (beta > 0) and the synchronous trainer, whose generation batches the reference follows."""
    beta = next((b for b in (trl.get("beta"), data.get("rl_beta"), data.get("dpo_beta")) if b is not None), None)
    if not beta:
        given = "unset (TRL's default 0.0)" if beta is None else "0"
        raise SettingError(
            f"rl: {rl} computes reference log-probs only for its KL term, and trl.beta is {given}, so the reference "
            "would never be read; set a KL weight",
            settings={key: reference, "trl.beta": NO_VALUE if beta is None else beta},
            allowed="trl.beta > 0 (e.g. 0.04; rl_beta is read when trl.beta is unset)",
        )
    asynchronous = {f"trl.{k}": trl[k] for k in ASYNC_GRPO_KEYS if trl.get(k)}
    if asynchronous:
        raise SettingError(
            "Axolotl's asynchronous GRPO trainer samples completions and computes their reference log-probs in a "
            "background thread, outside the generation batches where the reference is written",
            settings={key: reference, **asynchronous},
            allowed=" and ".join(f"{k}: false" for k in asynchronous),
        )


TrlEmaPluginArgs = flat_args_model(
    "TrlEmaPluginArgs",
    module=__name__,
    checks=(check_axolotl_keys,),
    doc="Every flat key of every feature, all optional (unset = off / the default).",
)


ARGS_PATH = f"{__name__}.TrlEmaPluginArgs"
