"""DeepSpeed ZeRO support: shadow layouts that keep 1/world of the averaged weights per rank.

* :class:`SlicedLayout`: replicated parameters (ZeRO-0/1/2, DDP): a contiguous slice each.
* :class:`Zero3Layout`: partitioned parameters (ZeRO-3): the rank's own partitions.

:func:`trl_ema_plugin.integrations.parallel.build_layout` picks one from the trainer's
DeepSpeed configuration; users set no flag.
"""

from .sliced import SlicedLayout
from .zero3 import Zero3Layout

__all__ = ["SlicedLayout", "Zero3Layout"]
