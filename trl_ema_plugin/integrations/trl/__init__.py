"""TRL / transformers integration: the callbacks, their common base and the ``attach`` entry."""

from .attach import attach
from .callback import WeightAveragingCallback
from .lifecycle import PluginCallback

__all__ = ["PluginCallback", "WeightAveragingCallback", "attach"]
