"""PyTorch FSDP support: FSDP2 (``fully_shard``) keeps 1/world of every average per rank; FSDP1 is refused.

* :class:`Fsdp2Layout`: this rank's dim-0 shard (``p.to_local()``) of each DTensor parameter.
* :func:`check_not_fsdp1`: the error that points FSDP1 users to FSDP2.
* :func:`unshard_above`: gather what the FSDP2 modules around a directly called submodule manage
  (the self-distillation replay of the decoder stack).

:func:`trl_ema_plugin.integrations.parallel.build_layout` picks the layout from the parameters
themselves; users set no flag.
"""

from .detect import check_not_fsdp1, fsdp1_evidence, requested_fsdp_version, uses_fsdp2
from .layout import Fsdp2Layout, fsdp2_modules, own_parameters, unshard_above

__all__ = [
    "Fsdp2Layout",
    "check_not_fsdp1",
    "fsdp1_evidence",
    "fsdp2_modules",
    "own_parameters",
    "requested_fsdp_version",
    "unshard_above",
    "uses_fsdp2",
]
