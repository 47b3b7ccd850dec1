"""Reuse the student's own forward for distillation: its hidden states, its logits when it built them, and which
positions are completions.

TRL 1.16 computes the SFT/DPO losses through a fused LM head that never builds the logits (its output has
per-token log-probabilities only), and so does TRL 1.9's default ``loss_type="chunked_nll"``; with
``loss_type="nll"`` (TRL 1.9) or a ``compute_loss_func`` (TRL 1.16) the forward builds them for every position
(``outputs.logits``, ``[batch, seq, V]``). All call the decoder backbone (``LlamaModel`` for a
``LlamaForCausalLM``) once with gradients. A forward hook on the backbone records that call (its arguments and
its last hidden state), and one on the model records the logits when its output has them, so distillation needs
no second student forward: the student logits are the trainer's own where they exist, else ``lm_head(h)`` on the
completion positions only, and the teacher forward replays the same backbone call (same arguments, hence the
same masks, positions and packing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

#: Backbone keyword arguments with one row per sequence; they are sliced when the teacher needs fewer rows.
ROW_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids"})


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PeftModel."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack whose output feeds the LM head (``causal_lm.base_model``, e.g. ``LlamaModel``)."""
    backbone = getattr(causal_lm, "base_model", None)
    if backbone is None or backbone is causal_lm or causal_lm.get_output_embeddings() is None:
        raise ValueError(
            f"self-distillation needs a causal LM with a decoder backbone and an LM head; got {type(causal_lm).__name__}"
        )
    return backbone


def _hidden(output: Any) -> Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def output_logits(causal_lm: nn.Module, hidden: Tensor) -> Tensor:
    """Logits ``head(h)`` as the model's forward computes them: times :func:`logit_multiplier`, then
    ``final_logit_softcapping`` (Gemma 2/3).

    Calls the head *module*, so DeepSpeed ZeRO-3 gathers its weight, and an adapter on the head applies.
    """
    logits = causal_lm.get_output_embeddings()(hidden)
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    multiplier = logit_multiplier(config)
    if multiplier is not None:
        logits = logits * multiplier
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logit_multiplier(config: Any) -> float | None:
    """The factor a model applies to ``head(h)``, read as TRL's fused LM head reads it: ``logit_scale``
    (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), else ``1/logits_scaling``
    (Granite, MiniCPM3; HyperCLOVA X multiplies by it). None: unscaled."""
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, key, None)
        if value is not None:
            return value
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return None
    return scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling


@dataclass
class BackboneCall:
    """One recorded call of the decoder backbone."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden: Tensor  # [batch, seq, hidden], part of the autograd graph of the task loss
    logits: Tensor | None = None  # [batch, seq, V] of the same forward, when the model built them (with grad)

    def full_logits(self, vocabulary: int) -> Tensor | None:
        """The recorded logits when they cover every position of :attr:`hidden` and the whole vocabulary."""
        logits = self.logits
        if logits is None or logits.dim() != 3 or logits.shape[:2] != self.hidden.shape[:2]:
            return None
        return logits if logits.size(-1) == vocabulary else None


class BackboneRecorder:
    """Records the first gradient-enabled backbone call inside :meth:`recording`."""

    def __init__(self, model: nn.Module) -> None:
        self.causal_lm = causal_lm_of(model)
        self.backbone = backbone_of(self.causal_lm)
        self._handle = self.backbone.register_forward_hook(self._hook, with_kwargs=True)
        # the outermost module the trainer calls: PEFT's LoraModel calls the causal LM's forward directly
        self._output_handle = model.register_forward_hook(self._output_hook)
        self._recording = False
        self._call: BackboneCall | None = None
        self._logits_seen = False

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._recording or self._call is not None or not torch.is_grad_enabled():
            return
        hidden = _hidden(output)
        if torch.is_tensor(hidden) and hidden.requires_grad:
            self._call = BackboneCall(args, dict(kwargs), hidden)

    def _output_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The logits of the forward whose backbone call was recorded (the first one that returns)."""
        if not self._recording or self._call is None or self._logits_seen or not torch.is_grad_enabled():
            return
        self._logits_seen = True
        logits = getattr(output, "logits", None)
        if torch.is_tensor(logits) and logits.requires_grad:
            self._call.logits = logits

    @contextmanager
    def recording(self, enabled: bool = True) -> Iterator[None]:
        self._call = None
        self._logits_seen = False
        self._recording = enabled
        try:
            yield
        finally:
            self._recording = False

    def take(self) -> BackboneCall:
        """The recorded student call (once)."""
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError(
                "self-distillation saw no gradient-enabled forward of the decoder backbone inside the trainer's "
                "compute_loss; this trainer computes its loss in a way the hook does not support"
            )
        return call

    def replay(self, call: BackboneCall, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Run the backbone again with the recorded arguments, on ``rows`` when they can be sliced.

        Returns the hidden states and the rows they belong to (all rows when slicing was not possible).
        """
        batch = call.hidden.size(0)
        args, kwargs = call.args, call.kwargs
        if not bool(rows.all()):
            sliced = _slice_rows(args, kwargs, rows, batch)
            if sliced is None:
                rows = torch.ones_like(rows)
            else:
                kwargs = sliced
        return _hidden(self.backbone(*args, **kwargs)), rows

    def remove(self) -> None:
        self._handle.remove()
        self._output_handle.remove()


def _slice_rows(args: tuple[Any, ...], kwargs: dict[str, Any], rows: Tensor, batch: int) -> dict[str, Any] | None:
    if any(torch.is_tensor(a) for a in args):
        return None
    sliced = {}
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.size(0) == batch:
            if key not in ROW_KEYS:
                return None
            value = value[rows.to(value.device)]
        sliced[key] = value
    return sliced


# --------------------------------------------------------------------------------- positions
def label_positions(inputs: dict[str, Any]) -> Tensor:
    """``[batch, seq]`` mask of the hidden positions whose next token is trained (``labels != -100``)."""
    if "shift_labels" in inputs:
        return inputs["shift_labels"] != -100
    if "labels" not in inputs:
        raise ValueError(
            "self-distillation needs 'labels' in the training batch (SFT-style, -100 outside the completion); "
            f"this batch has {sorted(inputs)}"
        )
    labels = inputs["labels"]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    return positions


def chosen_positions(inputs: dict[str, Any]) -> Tensor:
    """DPO batches are ``[chosen; rejected]`` with a ``completion_mask``: the chosen completion positions."""
    completion = inputs["completion_mask"].bool()
    positions = torch.zeros_like(completion)
    positions[:, :-1] = completion[:, 1:]
    positions[completion.size(0) // 2 :] = False
    return positions


def completion_positions(inputs: dict[str, Any]) -> Tensor:
    """GRPO/RLOO batches: ``prompt_ids`` [B, P] and the sampled ``completion_ids`` [B, C], fed as one sequence.

    Hidden position ``P − 1 + j`` predicts completion token ``j``; it counts where ``completion_mask``
    (times ``tool_mask``, when tools wrote some tokens) is set, as in the trainers' own loss.
    """
    mask = inputs["completion_mask"].bool()
    if "tool_mask" in inputs:
        mask = mask & inputs["tool_mask"].bool()
    prompt_length = inputs["prompt_ids"].size(1)
    positions = torch.zeros(mask.size(0), prompt_length + mask.size(1), dtype=torch.bool, device=mask.device)
    positions[:, prompt_length - 1 : prompt_length - 1 + mask.size(1)] = mask
    return positions
