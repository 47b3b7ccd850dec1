"""``attach(trainer)``: the one explicit entry for features that need the trainer itself.

Transformers callbacks never receive the trainer. ``attach`` hands it to every callback of ours in
``trainer.callback_handler`` (a :class:`~trl_ema_plugin.integrations.trl.lifecycle.PluginCallback`:
weight averaging, self-distillation, the DPO reference), adding a :class:`WeightAveragingCallback` first when
``averaging`` is given. It also records ``trainer.train(resume_from_checkpoint=...)`` so that
a checkpoint outside ``output_dir`` is found on resume.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from .callback import WeightAveragingCallback
from .lifecycle import PluginCallback


def plugin_callbacks(trainer: Any) -> list[PluginCallback]:
    """The callbacks of this package on ``trainer``, in the trainer's order."""
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PluginCallback)]


def attach(trainer: Any, averaging: WeightAveragingCallback | None = None) -> Any:
    """Connect our callbacks to ``trainer`` and return it."""
    handler = trainer.callback_handler
    if averaging is not None and averaging not in handler.callbacks:
        trainer.add_callback(averaging)
    attached = plugin_callbacks(trainer)
    if not attached:
        raise ValueError(
            "attach(trainer) found none of trl_ema_plugin's callbacks on the trainer; pass "
            "callbacks=[WeightAveragingCallback(...)] to the trainer or attach(trainer, WeightAveragingCallback(...))"
        )
    for callback in attached:
        callback.attach_to(trainer)
    _record_resume_argument(trainer, attached)
    return trainer


def _record_resume_argument(trainer: Any, callbacks: list[PluginCallback]) -> None:
    if getattr(trainer.train, "_trl_ema_plugin_wrapped", False):
        return
    original = trainer.train
    signature = inspect.signature(original)

    @functools.wraps(original)
    def train(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)  # positional or keyword, as Trainer.train takes it
        for callback in callbacks:
            callback.resume_from_checkpoint = bound.arguments.get("resume_from_checkpoint")
        return original(*args, **kwargs)

    train._trl_ema_plugin_wrapped = True  # type: ignore[attr-defined]
    trainer.train = train
