"""The YAML keys the plugin adds to Axolotl's config, generated from the pydantic config models.

Axolotl mixes :class:`TrlEmaPluginArgs` into its own config model (``get_input_args`` returns
this dotted path), so ``axolotl train`` validates our keys with the rest of the YAML and rejects
bad values with a message naming the key. The checks that involve Axolotl's own keys (``adapter``)
live here. No Axolotl import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from ...config.flat_keys import SELF_DISTILLATION, flat_args_model

PEFT_ADAPTERS = ("lora", "qlora")


class TrlEmaPluginArgs(flat_args_model("TrlEmaPluginKeys", module=__name__)):
    """Every flat key of every feature, all optional (unset = off / the default)."""

    @model_validator(mode="before")
    @classmethod
    def _trl_ema_plugin_check_axolotl_keys(cls, data: Any) -> Any:
        if (
            isinstance(data, Mapping)
            and data.get(SELF_DISTILLATION.prefix)
            and data.get("adapter") not in PEFT_ADAPTERS
        ):
            raise ValueError(
                f"{SELF_DISTILLATION.prefix}: true needs adapter: {' | '.join(PEFT_ADAPTERS)} (the teacher is a second "
                f"adapter on the same base model); got adapter: {data.get('adapter')}"
            )
        return data


ARGS_PATH = f"{__name__}.TrlEmaPluginArgs"
