"""TRL / transformers integration: the callback and the ``attach`` entry."""

from .attach import attach
from .callback import WeightAveragingCallback

__all__ = ["WeightAveragingCallback", "attach"]
