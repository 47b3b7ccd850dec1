"""Weight averaging (EMA, BEMA, DEMA, OUEMA) for LoRA/PEFT and full fine-tuning in TRL and Axolotl."""

from .averagers import BEMA, DEMA, EMA, OUEMA, Averager, register_averager, registered_methods
from .config import AveragerSpec, WeightAveragingConfig
from .integrations.trl import WeightAveragingCallback, attach
from .shadow import AveragedWeights

__version__ = "0.1.0"

__all__ = [
    "BEMA",
    "DEMA",
    "EMA",
    "OUEMA",
    "AveragedWeights",
    "Averager",
    "AveragerSpec",
    "WeightAveragingCallback",
    "WeightAveragingConfig",
    "attach",
    "register_averager",
    "registered_methods",
]
