"""One validated configuration, used by the TRL callback, the loss hook, the RLHF reference and Axolotl."""

from .averaging import AveragerSpec, WeightAveragingConfig

__all__ = ["AveragerSpec", "WeightAveragingConfig"]
