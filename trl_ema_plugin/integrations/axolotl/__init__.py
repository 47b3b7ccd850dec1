"""Axolotl integration: list ``trl_ema_plugin.integrations.axolotl.WeightAveragingPlugin`` under ``plugins:``.

Importing this package does not import Axolotl; the plugin class loads on first access, so the
package works on stacks without Axolotl.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrlEmaPluginArgs", "WeightAveragingPlugin"]


def __getattr__(name: str) -> Any:
    if name == "WeightAveragingPlugin":
        from .plugin import WeightAveragingPlugin

        return WeightAveragingPlugin
    if name == "TrlEmaPluginArgs":
        from .args import TrlEmaPluginArgs

        return TrlEmaPluginArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
