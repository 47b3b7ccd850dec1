"""The shadow store: which tensors are averaged, where their fp32 state lives, how it is sharded."""

from .layout import LocalLayout, ShadowLayout
from .selection import adapter_twin_names, parameters_by_name, trainable_parameters
from .store import AveragedWeights

__all__ = [
    "AveragedWeights",
    "LocalLayout",
    "ShadowLayout",
    "adapter_twin_names",
    "parameters_by_name",
    "trainable_parameters",
]
