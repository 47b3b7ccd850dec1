"""``SelfDistillationCallback``: add λ · τ² · D(student ‖ EMA/BEMA teacher) to a TRL trainer's loss.

After :func:`trl_ema_plugin.attach`, the trainer's own ``compute_loss`` is wrapped on the
instance (no copy of TRL's trainers). Per training micro-batch:

1. the trainer's ``compute_loss`` runs unchanged; hooks record the student's backbone call, and its
   logits when the trainer's forward builds them (TRL 1.9 with ``loss_type="nll"``, a ``compute_loss_func``;
   TRL 1.16's fused LM head and TRL 1.9's default ``chunked_nll`` do not);
2. the teacher adapter is refreshed from the averager when the averager has moved;
3. the backbone call is replayed with the teacher adapter (eval mode, no grad) on the rows
   that hold completion tokens (SFT: ``labels != -100``; DPO: the chosen completions; GRPO, RLOO:
   the sampled completion tokens, ``completion_mask``);
4. ``D`` is computed on the completion positions only, in chunks of tokens
   (:func:`~trl_ema_plugin.distillation.chunked_distillation_sum`): per chunk, the teacher's logits
   ``lm_head(h_T)`` and the student's (its recorded logits, else ``lm_head(h_S)``), the divergence, and its
   gradient with respect to the student's input; no full-vocabulary tensor of all tokens ever exists.
   With ``kernel="liger"`` Liger kernel's fused linear JSD does the same on CUDA.

Cost per distilled step: one teacher forward without gradient (DPO: on the chosen half of the
batch) plus the LM-head projection of the completion tokens for the teacher, and for the student where
the trainer does not build its logits (forward and the backward to ``h``). Warm-up steps, steps skipped by
``distill_every`` and evaluation cost nothing. An output layer that is trained or carries an adapter (LoRA on
``lm_head``, ``modules_to_save``) takes the unchunked reference computation instead.

The task loss and the added term are logged as ``loss/task`` and ``loss/distill``.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerControl, TrainerState, TrainingArguments

from ...config.distillation import SelfDistillationConfig
from ...distillation import ChunkedTerm, chunk_tokens, chunked_distillation_sum, per_token_distillation, teacher_targets
from ...distillation.chunked import CHUNK_ELEMENTS
from ...model_helpers import unwrap_model
from ...shadow import AveragedWeights
from ..fsdp import unshard_above
from .callback import WeightAveragingCallback
from .lifecycle import PluginCallback
from .liger import liger_distillation_sum, liger_unavailable
from .student_outputs import (
    BackboneCall,
    BackboneRecorder,
    chosen_positions,
    completion_positions,
    label_positions,
    output_logits,
)
from .teacher import TeacherAdapter
from .trainer_kinds import GENERATION_TRAINERS, trainer_kind

TASK_KEY = "loss/task"
DISTILL_KEY = "loss/distill"


def loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether the trainer leaves ``compute_loss``'s loss undivided by the accumulation steps (transformers' rule)."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    return (accepts and num_items_in_batch is not None) or getattr(trainer, "compute_loss_func", None) is not None


def distilled_positions_for(trainer: Any) -> Callable[[dict[str, Any]], Tensor]:
    """Which hidden positions of a training batch are distilled, by trainer kind (see :mod:`.student_outputs`)."""
    kind = trainer_kind(trainer)
    if kind == "DPO":
        return chosen_positions
    if kind in GENERATION_TRAINERS:
        return completion_positions
    return label_positions


class SelfDistillationCallback(PluginCallback):
    """Self-distillation from an averaged teacher, for TRL ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``.

    ``SFTTrainer(..., callbacks=[WeightAveragingCallback(method="bema", update_every=1),
    SelfDistillationCallback(lambda_=0.5, temperature=2.0)])`` then ``trl_ema_plugin.attach(trainer)``.
    Arguments are the fields of :class:`~trl_ema_plugin.config.distillation.SelfDistillationConfig`
    (``teacher``, ``divergence``, ``beta``, ``temperature``, ``lambda_``/``weight``, ``warmup_steps``,
    ``top_k``, ``distill_every``, ``adapter_name``).
    """

    config_class = SelfDistillationConfig
    config: SelfDistillationConfig
    #: elements of one ``[chunk, V]`` tensor of the chunked computation (the chunk is this / V tokens)
    chunk_elements: int = CHUNK_ELEMENTS
    #: compute the term unchunked (a second projection of every completion token, full-vocabulary
    #: log-probabilities), as before the chunked path; chosen by itself for a trained or adapted output layer
    use_reference_path: bool = False

    def __init__(self, config: SelfDistillationConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.averaging: WeightAveragingCallback | None = None
        self.teacher: TeacherAdapter | None = None
        self.recorder: BackboneRecorder | None = None
        self.teacher_forwards = 0
        self.logits_reused = 0  # distilled micro-batches whose student logits were the trainer's own
        self._reuse_logits = True
        self._positions: Callable[[dict[str, Any]], Tensor] = label_positions
        self._own_metrics: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------ attach
    def attach_to(self, trainer: Any) -> None:
        """Called by :func:`trl_ema_plugin.attach`: add the teacher adapter and wrap ``trainer.compute_loss``."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("this SelfDistillationCallback is already attached to another trainer")
        others = [
            cb
            for cb in trainer.callback_handler.callbacks
            if isinstance(cb, SelfDistillationCallback) and cb is not self
        ]
        if others:
            raise ValueError("a trainer takes one SelfDistillationCallback")
        if trainer_kind(trainer) == "KTO":
            raise ValueError(
                "self-distillation supports SFTTrainer, DPOTrainer, GRPOTrainer and RLOOTrainer, not KTOTrainer "
                "(its batches mix desirable and undesirable completions)"
            )
        self.averaging = self._find_averaging(trainer)
        model = unwrap_model(trainer.model)
        self.teacher = TeacherAdapter(model, self.config.adapter_name)
        self.recorder = BackboneRecorder(model)
        self._positions = distilled_positions_for(trainer)
        # GRPO/RLOO keep only the completion's logits and rescale them by their temperature: never reused
        self._reuse_logits = trainer_kind(trainer) not in GENERATION_TRAINERS
        original = trainer.compute_loss

        @functools.wraps(original)
        def compute_loss(
            model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None, **kw: Any
        ) -> Any:
            return self._compute_loss(original, model, inputs, return_outputs, num_items_in_batch, **kw)

        trainer.compute_loss = compute_loss
        super().attach_to(trainer)

    def _find_averaging(self, trainer: Any) -> WeightAveragingCallback:
        callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightAveragingCallback)]
        if not callbacks:
            raise ValueError(
                "self-distillation takes its teacher from a WeightAveragingCallback: pass "
                "callbacks=[WeightAveragingCallback(...), SelfDistillationCallback(...)] to the trainer"
            )
        wanted = self.config.teacher
        if wanted is None:
            return callbacks[0]
        for callback in callbacks:
            if wanted in [spec.label for spec in callback.config.averagers]:
                return callback
        names = [spec.label for cb in callbacks for spec in cb.config.averagers]
        raise ValueError(f"teacher={wanted!r} names no averager; the averagers are: {', '.join(names)}")

    def teacher_weights(self) -> AveragedWeights:
        """The averager the teacher follows (built by the averaging callback at train begin)."""
        assert self.averaging is not None
        if not self.averaging.weights:
            raise RuntimeError(
                "the WeightAveragingCallback has not set up its averagers yet (it does so at on_train_begin)"
            )
        name = self.config.teacher
        return self.averaging.weights[name] if name is not None else self.averaging.primary

    def check_run(self, args: TrainingArguments, state: TrainerState) -> None:
        if self.trainer is None:
            raise ValueError(
                "SelfDistillationCallback needs the trainer to add its loss term: call trl_ema_plugin.attach(trainer) "
                "before trainer.train()"
            )
        if self.config.kernel == "liger":
            assert self.recorder is not None
            reason = liger_unavailable(self.recorder.causal_lm, self._head_is_plain())
            if reason is not None:
                raise ValueError(f"kernel='liger' cannot run here: {reason}; use kernel='torch' (the default)")

    def _head_is_plain(self) -> bool:
        """Whether the output layer is frozen and carries no adapter: the teacher's projection is then the student's
        (the chunked path projects the teacher outside the teacher adapter, and needs no gradient of the head)."""
        assert self.recorder is not None
        head = self.recorder.causal_lm.get_output_embeddings()
        adapted = any(type(m).__module__.split(".")[0] == "peft" for m in head.modules())
        return not adapted and not any(p.requires_grad for p in head.parameters())

    def resume(self, args: TrainingArguments, state: TrainerState) -> str | None:
        """Nothing to restore: the teacher is rewritten from the averager, which resumes its own state."""
        return None

    # --------------------------------------------------------------------- loss
    def _compute_loss(
        self,
        original: Any,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: Any,
        **kw: Any,
    ) -> Any:
        trainer = self.trainer
        if not (trainer.model.training and torch.is_grad_enabled()):
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
        step = trainer.state.global_step
        averaged = self.teacher_weights()
        distill = self.config.lambda_ > 0 and self.config.distills_at(step) and averaged.started
        positions = self._positions(inputs).clone() if distill else None
        assert self.recorder is not None
        with self.recorder.recording(enabled=distill):
            result = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
        loss = result[0] if return_outputs else result

        scaled = loss_is_scaled_for_ga(trainer, num_items_in_batch)
        accumulation = getattr(trainer, "current_gradient_accumulation_steps", 1) or 1
        report = accumulation if scaled else 1  # logged values are per micro-batch means, like the trainer's loss
        term = None
        if distill:
            assert positions is not None and self.teacher is not None
            self.teacher.refresh(averaged, step, trainer.args)
            total, count = self._divergence_sum(self.recorder.take(), positions)
            denominator = self._denominator(count, scaled, num_items_in_batch, accumulation, loss)
            term = self.config.lambda_ * total / denominator
        distilled = term.detach().float() if term is not None else torch.zeros((), device=loss.device)
        task_value, distill_value = self._mean_over_ranks(
            torch.stack([loss.detach().float().mean(), distilled]) * report
        )
        self._log(TASK_KEY, task_value)
        self._log(DISTILL_KEY, distill_value)
        if term is not None:
            loss = loss + term.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss

    def _denominator(
        self, count: int, scaled: bool, num_items_in_batch: Any, accumulation: int, loss: Tensor
    ) -> Tensor | float:
        """Normalise like the task loss: by the batch's token count when the trainer does, else per micro-batch."""
        if scaled and num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
            if getattr(self.trainer.args, "average_tokens_across_devices", False):
                # as transformers scales the task loss: by the data-parallel world (ranks of one TP group share data)
                tensor_parallel = self.trainer.get_tp_size() if hasattr(self.trainer, "get_tp_size") else 1
                denominator = denominator / (self.trainer.accelerator.num_processes // tensor_parallel)
            return denominator
        return max(count, 1) * (accumulation if scaled else 1)

    def _divergence_sum(self, call: BackboneCall, positions: Tensor) -> tuple[Tensor, int]:
        """``Σ τ² · D`` over the completion positions of ``call``, and their number."""
        assert self.recorder is not None and self.teacher is not None
        hidden = call.hidden
        if positions.shape != hidden.shape[:2]:
            raise ValueError(
                f"the completion mask {tuple(positions.shape)} does not match the backbone output {tuple(hidden.shape[:2])}; "
                "self-distillation needs one hidden state per input token"
            )
        positions = positions.to(hidden.device)
        rows = positions.any(dim=1)
        if not bool(rows.any()):
            rows = torch.ones_like(rows)  # every rank runs the teacher forward (ZeRO-3 gathers are collective)
        reference = self.use_reference_path or not self._head_is_plain()
        lm = self.recorder.causal_lm
        unshard_above(self.teacher.model, self.recorder.backbone)  # FSDP2: the replay runs no root hook
        config = self.config
        with self.teacher.active():
            teacher_hidden, rows = self.recorder.replay(call, rows)
            teacher_rows = teacher_hidden[positions[rows]]  # [N, H], no grad
            del teacher_hidden
            if reference:  # the head may carry the teacher adapter: project inside the teacher context
                targets = teacher_targets(output_logits(lm, teacher_rows), config.temperature, config.top_k)
        self.teacher_forwards += 1
        if reference:
            student_logits = output_logits(lm, hidden[positions])
            per_token = per_token_distillation(
                student_logits,
                targets,
                divergence=config.divergence,
                beta=config.jsd_beta,
                temperature=config.temperature,
            )
            return per_token.sum(), per_token.numel()
        if config.kernel == "liger":
            return liger_distillation_sum(lm, hidden, positions, teacher_rows, config)
        return self._chunked_sum(call, positions, teacher_rows)

    def _chunked_sum(self, call: BackboneCall, positions: Tensor, teacher_rows: Tensor) -> tuple[Tensor, int]:
        """The term in chunks of tokens; the student's logits are the trainer's own when it built them."""
        lm = self.recorder.causal_lm  # type: ignore[union-attr]
        config = self.config
        vocabulary = lm.get_output_embeddings().out_features
        logits = call.full_logits(vocabulary) if self._reuse_logits else None
        self.logits_reused += logits is not None
        index = positions.reshape(-1).nonzero().squeeze(1)
        term = ChunkedTerm(
            student_head=None if logits is not None else (lambda h: output_logits(lm, h)),
            teacher_logits=lambda lo, hi: output_logits(lm, teacher_rows[lo:hi]),
            divergence=config.divergence,
            beta=config.jsd_beta,
            temperature=config.temperature,
            top_k=config.top_k,
            chunk=chunk_tokens(vocabulary, self.chunk_elements),
        )
        source = logits if logits is not None else call.hidden
        return chunked_distillation_sum(source, index, term), index.numel()

    # ------------------------------------------------------------------ logging
    def _mean_over_ranks(self, values: Tensor) -> list[float]:
        """The mean over processes (one all-gather; every rank computes the loss, so every rank calls it)."""
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            values = accelerator.gather(values.unsqueeze(0)).mean(dim=0)
        return values.tolist()

    def _log(self, key: str, value: float) -> None:
        metrics = getattr(self.trainer, "_metrics", None)
        store = getattr(self.trainer, "store_metrics", None)  # Axolotl's trainers: averaged into the next log
        if isinstance(metrics, dict) and isinstance(metrics.get("train"), dict):
            metrics["train"].setdefault(key, []).append(value)
        elif callable(store):
            store({key: value}, train_eval="train")
        else:
            self._own_metrics[key].append(value)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """For trainers without TRL's ``_metrics``: add the averaged terms to the logs."""
        if logs is None or not self._own_metrics or any(k.startswith("eval_") for k in logs):
            return
        for key, values in self._own_metrics.items():
            if values:
                logs[key] = sum(values) / len(values)
        self._own_metrics.clear()
