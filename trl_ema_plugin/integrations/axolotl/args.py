"""The YAML keys the plugin adds to Axolotl's config, generated from the pydantic config models.

Axolotl mixes :data:`TrlEmaPluginArgs` into its own config model (``get_input_args`` returns
this dotted path), so ``axolotl train`` validates ``weight_averaging*`` keys with the rest of
the YAML and rejects bad values with a message naming the key. No Axolotl import here.
"""

from __future__ import annotations

from ...config.flat_keys import flat_args_model

#: every flat key of every feature, all optional (unset = off / default)
TrlEmaPluginArgs = flat_args_model("TrlEmaPluginArgs", module=__name__)

ARGS_PATH = f"{__name__}.TrlEmaPluginArgs"
