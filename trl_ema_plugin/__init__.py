"""Weight averaging (EMA, BEMA, DEMA, OUEMA, post-hoc EMA) for LoRA/PEFT and full fine-tuning in TRL and Axolotl."""

from .averagers import BEMA, DEMA, EMA, OUEMA, Averager, register_averager, registered_methods
from .config import AveragerSpec, WeightAveragingConfig
from .config.advice import ExtrapolationWarning
from .config.distillation import SelfDistillationConfig
from .config.posthoc import PostHocEMAConfig
from .config.reference import DPOReferenceConfig, ReferenceConfig
from .integrations.trl import WeightAveragingCallback, attach
from .integrations.trl.distillation import SelfDistillationCallback
from .integrations.trl.posthoc import PostHocEMACallback
from .integrations.trl.reference import AveragedReferenceCallback, add_reference_adapter
from .shadow import AveragedWeights

__version__ = "0.1.0"

__all__ = [
    "BEMA",
    "DEMA",
    "EMA",
    "OUEMA",
    "AveragedReferenceCallback",
    "AveragedWeights",
    "Averager",
    "AveragerSpec",
    "DPOReferenceConfig",
    "ExtrapolationWarning",
    "PostHocEMACallback",
    "PostHocEMAConfig",
    "ReferenceConfig",
    "SelfDistillationCallback",
    "SelfDistillationConfig",
    "WeightAveragingCallback",
    "WeightAveragingConfig",
    "add_reference_adapter",
    "attach",
    "register_averager",
    "registered_methods",
]
