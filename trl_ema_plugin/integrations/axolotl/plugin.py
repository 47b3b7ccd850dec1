"""``WeightAveragingPlugin``: turns the YAML keys into callbacks on Axolotl's trainer.

Hooks, in the order Axolotl calls them:

* ``get_input_args``: the pydantic model of our keys, validated with Axolotl's config;
* ``add_callbacks_post_trainer(cfg, trainer)``: a :class:`WeightAveragingCallback` built from
  the ``weight_averaging*`` keys, a :class:`SelfDistillationCallback` from the
  ``self_distillation*`` keys (SFT and ``rl: dpo`` alike) and an :class:`AveragedReferenceCallback`
  from the ``dpo_reference*`` keys (``rl: dpo``);
* ``post_trainer_create(cfg, trainer)``: :func:`trl_ema_plugin.attach` hands the trainer to every
  feature's callback (full averaged evaluation metrics, resume from any path, the teacher adapter,
  the distillation loss term, the ``"ref"`` adapter), before ``trainer.train()`` builds a DeepSpeed
  engine, so ZeRO-3 partitions the added adapters too.

No model-load hook is needed: for ``rl: dpo`` Axolotl hands ``peft_config`` to TRL's trainer, which
wraps the model itself, so the ``"ref"`` adapter can only be added once the trainer exists.
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from ...config.flat_keys import (
    dpo_reference_config_from_flat,
    self_distillation_config_from_flat,
    weight_averaging_config_from_flat,
)
from ..trl import WeightAveragingCallback, attach
from ..trl.attach import plugin_callbacks
from ..trl.distillation import SelfDistillationCallback
from ..trl.dpo_reference import AveragedReferenceCallback
from .args import ARGS_PATH

logger = logging.getLogger(__name__)


class WeightAveragingPlugin(BasePlugin):
    """Weight averaging, self-distillation and a moving DPO reference for ``axolotl train``, set by YAML keys."""

    def get_input_args(self) -> str:
        return ARGS_PATH

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        callbacks: list[Any] = []
        averaging = weight_averaging_config_from_flat(cfg)
        if averaging is not None:
            names = ", ".join(f"{s.label} ({s.method})" for s in averaging.averagers)
            logger.info("trl_ema_plugin: weight averaging with %s", names)
            callbacks.append(WeightAveragingCallback(config=averaging))
        distillation = self_distillation_config_from_flat(cfg)
        if distillation is not None:
            logger.info("trl_ema_plugin: self-distillation, λ=%s, τ=%s", distillation.lambda_, distillation.temperature)
            callbacks.append(SelfDistillationCallback(config=distillation))
        reference = dpo_reference_config_from_flat(cfg)
        if reference is not None:
            logger.info("trl_ema_plugin: DPO reference adapter follows %s", reference.method)
            callbacks.append(AveragedReferenceCallback(config=reference))
        return callbacks

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if plugin_callbacks(trainer):
            attach(trainer)
