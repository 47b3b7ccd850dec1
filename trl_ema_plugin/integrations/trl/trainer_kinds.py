"""What the plugin needs to know about TRL's trainers: which sample completions, which evaluate without labels.

* **Preference trainers** (``DPOTrainer``, ``KTOTrainer``) read the reference on every micro-batch.
* **Generation trainers** (``GRPOTrainer``, ``RLOOTrainer``) sample a *generation batch* every
  G = ``steps_per_generation·num_iterations / gradient_accumulation_steps`` optimizer steps and compute
  its reference log-probs once, inside ``_generate_and_score_completions``; the optimizer steps of one
  generation batch share them. Their KL term (and so any reference forward) is off at ``beta=0.0``.

Classes are matched with ``isinstance``, so Axolotl's subclasses (``AxolotlGRPOConfig``, ...) count too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

#: TRL trainers (and configs) that sample completions and score them in generation batches
GENERATION_TRAINERS = ("GRPO", "RLOO")
#: TRL configs whose eval batches have no ``labels`` for the loss-only pass (they need the trainer's own loop)
LABEL_FREE_TRAINERS = ("DPO", "KTO", *GENERATION_TRAINERS)


def trainer_kind(obj: Any) -> str | None:
    """``"DPO"``, ``"KTO"``, ``"GRPO"``, ``"RLOO"`` for a TRL trainer or its config (or a subclass); else None."""
    import trl

    for kind in LABEL_FREE_TRAINERS:
        classes = tuple(c for suffix in ("Trainer", "Config") if (c := getattr(trl, kind + suffix, None)) is not None)
        if classes and isinstance(obj, classes):
            return kind
    return None


def generates_completions(obj: Any) -> bool:
    """Whether ``obj`` (a trainer or its config) is GRPO or RLOO: reference log-probs once per generation batch."""
    return trainer_kind(obj) in GENERATION_TRAINERS


def evaluates_without_labels(args: Any) -> bool:
    """Whether the eval batches of this config's trainer carry no ``labels`` (preference and RL trainers)."""
    return trainer_kind(args) is not None


def is_dpo(trainer: Any) -> bool:
    return trainer_kind(trainer) == "DPO"


def generation_period(args: Any) -> float:
    """Optimizer steps between two generation batches: ``steps_per_generation·num_iterations / accumulation``."""
    per_generation = (getattr(args, "steps_per_generation", None) or 1) * (getattr(args, "num_iterations", 1) or 1)
    return per_generation / max(getattr(args, "gradient_accumulation_steps", 1) or 1, 1)


def before_each_generation(trainer: Any, hook: Callable[[], None]) -> None:
    """Call ``hook()`` right before each *training* generation batch of a GRPO/RLOO trainer is sampled and scored.

    Wraps ``trainer._generate_and_score_completions`` on the instance (TRL 1.9 and 1.16, and subclasses that
    override it): every rank calls it at the same point, so ``hook`` may run collectives. Evaluation batches
    (the model in eval mode) do not call ``hook``.
    """
    original = trainer._generate_and_score_completions

    @functools.wraps(original)
    def generate_and_score(*args: Any, **kwargs: Any) -> Any:
        if trainer.model.training:
            hook()
        return original(*args, **kwargs)

    trainer._generate_and_score_completions = generate_and_score
