"""Averager math: EMA, BEMA, DEMA, OUEMA, the power-function EMA over lists of fp32 tensors. No trainer, no nn.Module."""

from .base import Averager
from .bema import BEMA
from .dema import DEMA
from .ema import EMA
from .ouema import OUEMA
from .power import PowerFunctionEMA
from .registry import ENTRY_POINT_GROUP, averager_class, register_averager, registered_methods

__all__ = [
    "BEMA",
    "DEMA",
    "EMA",
    "ENTRY_POINT_GROUP",
    "OUEMA",
    "Averager",
    "PowerFunctionEMA",
    "averager_class",
    "register_averager",
    "registered_methods",
]
