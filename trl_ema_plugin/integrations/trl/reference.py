"""A moving RLHF reference for LoRA: the ``"ref"`` adapter follows an average of the policy adapter.

TRL's ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer`` and ``RLOOTrainer`` compute the reference
log-probs of a PeftModel with the adapter named ``"ref"`` when the model has one
(``use_adapter(model, "ref")``, TRL 1.9 and 1.16), so the reference policy is *base model + "ref"
adapter*. :class:`AveragedReferenceCallback` keeps its own running average of the policy adapter
``"default"`` (BEMA, EMA, ... or TR-DPO's mixup) and writes it into ``"ref"``:

* **DPO, KTO** read the reference on every micro-batch: ``"ref"`` is written after every sync step s
  (``s % ref_update_every == 0``, ``s ≥ update_after``); after t optimizer steps the reference is
  ref_t = θ̂_s, s = the last sync step ≤ t.
* **GRPO, RLOO** read it once per generation batch (every ``steps_per_generation·num_iterations``
  micro-batches): ``"ref"`` is written only there, right before the batch's reference forward, with the
  average of that moment, θ̂_g (g = optimizer steps done), when a sync step passed since the last write.
  Every reference forward sees the latest sync; all optimizer steps of one generation batch share one
  reference.

The frozen base weights are never written (unlike TRL's experimental BEMA-for-reference), and
no second copy of the base model exists. Under DeepSpeed ZeRO and FSDP2 the ``"ref"`` parameters are
sharded like the policy's, and each rank writes its own shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from ...config.advice import never_updates
from ...config.reference import ReferenceConfig
from ...model_helpers import is_peft_model, unwrap_model
from ...persistence import write_state_folder
from ...shadow import AveragedWeights, ShadowLayout, adapter_twin_names, parameters_by_name, trainable_parameters
from ...shadow.runner import UpdateRunner, build_runner, choose_schedule
from ..parallel import build_layout, engine_restores_model, pack_adapter_weights, sharded_by
from .lifecycle import PluginCallback
from .trainer_kinds import before_each_generation, generates_completions, trainer_kind
from .twin_adapter import add_twin_adapter

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "ref"
#: checkpoint sub-folder: the averager state and the reference values (no adapter files)
REFERENCE_FOLDER = "reference"
#: older names of that folder, still read on resume
LEGACY_REFERENCE_FOLDERS = ("dpo_reference",)
_REFERENCE_KEY = "reference/"
#: log key prefix of the skipped-update count of the reference's averager: ``reference/<name>/skipped_updates``
SKIPPED_PREFIX = "reference"


# --------------------------------------------------------------------------- the "ref" adapter
def add_reference_adapter(model: nn.Module, peft_config: Any = None) -> nn.Module:
    """Return a PeftModel that has a frozen ``"ref"`` adapter, a copy of ``"default"``.

    ``model`` is a PeftModel, or a plain model together with ``peft_config`` (it is wrapped with
    ``get_peft_model``). Idempotent: an existing ``"ref"`` adapter is kept. The base weights
    are not touched. Call it on the trainer's model (``add_reference_adapter(trainer.model)``), or
    let :func:`trl_ema_plugin.attach` do it: TRL's trainers add ``"ref"`` themselves when they are
    given a PeftModel, and TRL 1.16 refuses a PeftModel that already has one.
    """
    if not is_peft_model(model):
        if peft_config is None:
            raise ValueError(
                "add_reference_adapter() needs a PeftModel, or a plain model together with peft_config=LoraConfig(...)"
            )
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    elif peft_config is not None:
        raise ValueError("add_reference_adapter() got a PeftModel and a peft_config; pass only one of them")
    if POLICY_ADAPTER not in model.peft_config:
        raise ValueError(
            f"the PeftModel has no {POLICY_ADAPTER!r} adapter (it has {sorted(model.peft_config)}); "
            f"TRL's trainers train {POLICY_ADAPTER!r} and read the reference from {REFERENCE_ADAPTER!r}"
        )
    if REFERENCE_ADAPTER in model.peft_config:
        return model
    add_twin_adapter(model, POLICY_ADAPTER, REFERENCE_ADAPTER)
    return model


# ------------------------------------------------------------------------------------ callback
class AveragedReferenceCallback(PluginCallback):
    """Make the reference ``"ref"`` adapter an averaged copy of the policy adapter (DPO, KTO, GRPO, RLOO).

    ``DPOTrainer(model=peft_model, ..., callbacks=[AveragedReferenceCallback(method="bema",
    update_every=1, ref_update_every=32)])``. Arguments are the fields of
    :class:`~trl_ema_plugin.config.reference.ReferenceConfig`. Standalone: it keeps its own
    average, independent of ``WeightAveragingCallback``. GRPO and RLOO need :func:`trl_ema_plugin.attach`
    (the reference is written at their generation batches, see the module docstring).

    Refused with a clear error: ``precompute_ref_log_probs=True`` (a precomputed reference cannot move),
    ``sync_ref_model=True`` (TRL's own reference sync), GRPO/RLOO with ``beta=0.0`` (no reference forward
    ever happens), a separate ``ref_model``, and a model that is not a PeftModel.

    Checkpoints get ``checkpoint-N/reference/`` (the averager state and the reference values; a
    ``dpo_reference/`` folder of earlier versions is read too), restored on resume; the trainer itself
    writes the reference adapter to ``checkpoint-N/ref/``, loadable with ``PeftModel.from_pretrained``.
    """

    config_class = ReferenceConfig
    config: ReferenceConfig

    def __init__(self, method: str | None = None, *, config: ReferenceConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **({"method": method} if method is not None else {}), **kwargs)
        self.weights: AveragedWeights | None = None
        self.policy: ShadowLayout | None = None
        self.reference: ShadowLayout | None = None
        #: the last step whose average was written into "ref" (None: "ref" is still the initial adapter)
        self.last_sync_step: int | None = None
        #: GRPO/RLOO: True once attached; "ref" is then written at generation batches, not at sync steps
        self.at_generations = False
        #: GRPO/RLOO: (g, s) per training generation batch: sampled after optimizer step g, whose reference
        #: forward read the average of step s (None: the initial adapter)
        self.generations: list[tuple[int, int | None]] = []

    # -------------------------------------------------------------------- checks
    def attach_to(self, trainer: Any) -> None:
        """Called by :func:`trl_ema_plugin.attach`: checks the trainer and adds ``"ref"`` if it is missing.

        Adding it here, before ``trainer.train()`` builds the DeepSpeed engine or applies FSDP2, lets
        ZeRO-3 and FSDP2 shard the reference adapter like the policy. On GRPO and RLOO it also hooks the
        generation batches, where the reference is written.
        """
        again = self.trainer is trainer
        super().attach_to(trainer)
        check_arguments(trainer.args)
        model = unwrap_model(trainer.model)
        require_peft_model(model)  # first: DPOTrainer builds a ref_model itself for a model without adapters
        if getattr(trainer, "ref_model", None) is not None:
            raise ValueError(
                "AveragedReferenceCallback drives the 'ref' adapter of the policy PeftModel, but the trainer was "
                "given a separate ref_model, which the trainer would use instead; drop ref_model=..."
            )
        add_reference_adapter(model)
        if generates_completions(trainer) and not again:
            before_each_generation(trainer, self._before_generation)
            self.at_generations = True

    # ----------------------------------------------------------------- training
    def check_run(self, args: TrainingArguments, state: TrainerState) -> None:
        check_arguments(args)
        if generates_completions(args) and not self.at_generations:
            raise ValueError(
                f"{trainer_kind(args)}Trainer computes the reference log-probs once per generation batch, and "
                "AveragedReferenceCallback writes the reference there: call trl_ema_plugin.attach(trainer) before "
                "trainer.train()"
            )
        self._warn_if_never_synced(state.max_steps)

    def setup(self, model: nn.Module, args: TrainingArguments) -> None:
        """Find (or add) the ``"ref"`` adapter and build the policy/reference layouts and the averager."""
        model = unwrap_model(model)
        require_peft_model(model)
        if REFERENCE_ADAPTER not in model.peft_config:
            engine = sharded_by(args, model)
            if engine is not None:
                raise ValueError(
                    f"the model has no 'ref' adapter, and under {engine} it must exist before the model is sharded: "
                    "pass a PeftModel to the trainer (TRL then adds 'ref'), or call trl_ema_plugin.attach(trainer) "
                    "before trainer.train()"
                )
            add_reference_adapter(model)  # before any optimizer step, so "default" still holds θ_0
        self.model = model
        named = trainable_parameters(model)
        names = [n for n, _ in named]
        self.policy = build_layout(named, args, model=model)
        pack_adapter_weights(self.policy, model, args)
        twins = parameters_by_name(model, adapter_twin_names(names, POLICY_ADAPTER, REFERENCE_ADAPTER))
        self.reference = build_layout(twins, args, model=model)
        if self.policy.local_sizes() != self.reference.local_sizes():
            raise ValueError("the 'ref' adapter is not shaped like the policy adapter 'default'")
        spec = self.config.averager_spec()
        device = torch.device("cpu") if self.config.offload else self.policy.device
        if spec is None:
            self.weights = None
            return
        schedule = choose_schedule(self.policy, self.config.offload, engine_restores_model(args, model))
        runner = build_runner(schedule, self.policy, device)
        self.weights = AveragedWeights(spec.for_run(self.run_max_steps), self.policy, device, runner=runner)

    def runners(self) -> list[UpdateRunner]:
        return [] if self.weights is None else [self.weights.runner]

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close_runners()
        super().on_train_end(args, state, control, **kwargs)

    def start(self, global_step: int) -> None:
        if self.weights is not None:
            self.weights.step(global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if self.weights is not None:
            self.weights.step(step)
            self.report_skips([self.weights], SKIPPED_PREFIX, control)
        if not self.at_generations and self.config.is_sync_step(step):
            self.sync(step)
        super().on_step_end(args, state, control, **kwargs)

    def _before_generation(self) -> None:
        """GRPO/RLOO, before a training generation batch: ref ← θ̂_g if a sync step passed since the last write."""
        step = self.trainer.state.global_step
        last = 0 if self.last_sync_step is None else self.last_sync_step
        if any(self.config.is_sync_step(s) for s in range(last + 1, step + 1)):
            self.sync(step)
        self.generations.append((step, self.last_sync_step))

    @torch.no_grad()
    def sync(self, step: int) -> None:
        """ref ← θ̂_step (this rank's partition; the next forward on every rank sees it)."""
        assert self.policy is not None and self.reference is not None
        if self.weights is None:  # TR-DPO hard update
            values = self.policy.local_tensors()
        elif not self.weights.started:
            return
        else:
            values = self.weights.average_local(step)  # waits for the update in flight
        self.reference.write_local(values)
        self.last_sync_step = step

    def _warn_if_never_synced(self, max_steps: int) -> None:
        if max_steps <= 0:
            return
        first = self.config.first_sync_step()
        spec = self.config.averager_spec()
        reason = None if spec is None else never_updates(spec, max_steps)
        # GRPO/RLOO write "ref" at the next generation batch, which comes after a step < max_steps only
        last_write = max_steps - 1 if self.at_generations else max_steps
        if first > last_write:
            self.warn(
                f"the reference will never move: its first sync is at step {first} (ref_update_every/"
                f"ref_model_sync_steps={self.config.sync_every}, update_after={self.config.starts_at}), but training "
                f"stops at step {max_steps}; the reference stays the initial adapter"
            )
        elif spec is not None and reason is not None:
            self.warn(
                f"the reference averager will never update: {reason}; every sync writes the policy adapter of "
                f"step {spec.update_after}. Lower update_every (alias update_freq)."
            )

    # ------------------------------------------------------------------- views
    @torch.no_grad()
    def reference_tensors(self) -> dict[str, Tensor]:
        """Full ``"ref"`` adapter tensors by parameter name (collective under ZeRO)."""
        assert self.reference is not None
        full = self.reference.gather([t.clone() for t in self.reference.local_tensors()])
        return dict(zip(self.reference.names, full, strict=True))

    def describe(self) -> str:
        return f"AveragedReferenceCallback(method={self.config.method!r})"

    def one_of_a_kind_hint(self) -> str:
        return "A trainer has one reference: keep one AveragedReferenceCallback."

    def memory_bytes(self) -> int:
        """fp32 averager state held by this rank (the ``"ref"`` adapter itself is one more adapter)."""
        return 0 if self.weights is None else self.weights.memory_bytes()

    # ------------------------------------------------------------ checkpoints
    def checkpoint_folders(self) -> list[str]:
        return [REFERENCE_FOLDER]

    def has_checkpoint_state(self) -> bool:
        return self.reference is not None

    def save(self, parent: str | os.PathLike[str], global_step: int, writer: bool = True) -> None:
        """Write ``parent/reference/`` (``averager_state.*``, format of :mod:`~trl_ema_plugin.persistence`,
        plus the ``"ref"`` tensors under ``reference/<name>``). Collective: call on every rank; ``writer`` writes."""
        reference = self.reference_tensors()
        tensors = {f"{_REFERENCE_KEY}{n}": t.detach().to("cpu").contiguous() for n, t in reference.items()}
        averager = None
        if self.weights is not None:
            tensors.update(self.weights.state_tensors())
            averager = self.weights.state_metadata()
        if not writer:
            return
        metadata = {
            "reference": self.config.model_dump(mode="json"),
            "averager": averager,
            "last_sync_step": self.last_sync_step,
        }
        # no adapter_model.safetensors here: the trainer would load this folder as an adapter on resume
        write_state_folder(Path(parent) / REFERENCE_FOLDER, tensors, metadata, global_step)

    @staticmethod
    def state_folder(checkpoint: str | os.PathLike[str]) -> str:
        """The reference folder's name in ``checkpoint``: ``reference``, else an older name that exists there."""
        if not (Path(checkpoint) / REFERENCE_FOLDER).is_dir():
            for name in LEGACY_REFERENCE_FOLDERS:
                if (Path(checkpoint) / name).is_dir():
                    return name
        return REFERENCE_FOLDER

    @torch.no_grad()
    def load(self, checkpoint: str | os.PathLike[str], global_step: int | None = None) -> None:
        """Restore the reference adapter and the averager from ``checkpoint/reference/`` (every rank),
        saved at ``global_step``."""
        assert self.reference is not None and self.policy is not None
        name = self.state_folder(checkpoint)
        saved = self.read_checkpoint_state(
            checkpoint, name, global_step, "", "the reference restarts from the current policy adapter"
        )
        if saved is None:
            self.reference.write_local([t.clone() for t in self.policy.local_tensors()])
            return
        tensors, metadata = saved
        folder = Path(checkpoint) / name
        keys = [f"{_REFERENCE_KEY}{n}" for n in self.reference.names]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(
                f"{folder} lacks reference tensors, e.g. {missing[0]!r}; was it written for another model?"
            )
        self.reference.write_local(self.reference.local_part([tensors[k] for k in keys]))
        if self.weights is not None:
            if metadata.get("averager") is None:
                raise ValueError(f"{folder} holds no averager state, but this run averages with {self.config.method!r}")
            self.restore_averager(self.weights, tensors, metadata["averager"], checkpoint, name)
        self.last_sync_step = metadata.get("last_sync_step")


# ------------------------------------------------------------------------------------ helpers
def require_peft_model(model: nn.Module) -> None:
    if not is_peft_model(model):
        raise ValueError(
            "AveragedReferenceCallback needs a PEFT (LoRA) policy: the reference is the base model plus the 'ref' "
            f"adapter; got {type(model).__name__}. Pass get_peft_model(model, LoraConfig(...)) or peft_config=..."
        )


def check_arguments(args: Any) -> None:
    """Refuse a trainer without a reference, and settings under which the reference cannot follow the average,
    or is never read."""
    if trainer_kind(args) is None:
        raise ValueError(
            "AveragedReferenceCallback moves the reference policy (the 'ref' adapter) of TRL's DPO, KTO, GRPO and "
            f"RLOO trainers, but this run is trained with {type(args).__name__}, which has no reference forward: "
            "remove the callback, or train with one of those trainers"
        )
    if getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(
            "AveragedReferenceCallback moves the reference during training, but precompute_ref_log_probs=True "
            "computes the reference log-probs once, before training; set precompute_ref_log_probs=False"
        )
    if getattr(args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True is TRL's own reference update, which does not support PEFT; with "
            "AveragedReferenceCallback set sync_ref_model=False and use method='tr_dpo' with ref_model_sync_steps "
            "and ref_model_mixup_alpha for the same rule (TR-DPO)"
        )
    if generates_completions(args) and getattr(args, "beta", None) == 0.0:
        kind = trainer_kind(args)
        raise ValueError(
            f"{kind}Config(beta=0.0) turns the KL term off (TRL's GRPO default), so {kind}Trainer never computes "
            "reference log-probs and a moving reference would never be read; set beta > 0 (e.g. beta=0.04), or "
            "drop AveragedReferenceCallback"
        )
