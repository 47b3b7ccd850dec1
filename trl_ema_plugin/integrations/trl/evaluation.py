"""Evaluate averaged weights: metric names and the trainer-free loss pass."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def eval_prefix(metrics: dict[str, Any]) -> str:
    """The prefix of the evaluation that produced ``metrics``: ``eval`` or ``eval_<dataset>``."""
    if "eval_loss" in metrics or not metrics:
        return "eval"
    losses = sorted((k for k in metrics if k.endswith("_loss")), key=len)
    return losses[0][: -len("_loss")] if losses else "eval"


def averaged_prefix(prefix: str, name: str) -> str:
    """``eval`` + ``ema`` → ``eval_ema`` (so the loss is ``eval_ema_loss``)."""
    return f"{prefix}_{name}"


def _forward_keys(model: nn.Module) -> set[str] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


@torch.no_grad()
def mean_eval_loss(model: nn.Module, dataloader: Any) -> float:
    """Batch-size-weighted mean of ``model(**batch).loss`` over ``dataloader``, as ``eval_loss`` is."""
    keys = _forward_keys(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            inputs = {k: v for k, v in batch.items() if keys is None or k in keys}
            if "labels" not in inputs:
                raise ValueError(
                    "averaged evaluation without the trainer needs batches with 'labels' (SFT-style); "
                    "for DPO and other trainers call trl_ema_plugin.attach(trainer), or set eval=False"
                )
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            loss = model(**inputs).loss
            size = inputs["labels"].shape[0]
            total += float(loss.detach().float()) * size
            count += size
    finally:
        model.train(was_training)
    total, count = _sum_over_ranks(total, count, device)
    if count == 0:
        raise ValueError("the evaluation dataloader is empty")
    return total / count


def _sum_over_ranks(total: float, count: int, device: torch.device) -> tuple[float, int]:
    """Under several processes each rank saw its shard of the evaluation set: add them up."""
    import torch.distributed as dist

    from ...distributed import communication_device, world_size

    if world_size() == 1:
        return total, count

    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=communication_device(device))
    dist.all_reduce(sums)
    return float(sums[0]), int(sums[1])


@torch.no_grad()
def evaluate_with_trainer(trainer: Any, prefix: str, dataloader: Any = None) -> dict[str, float]:
    """Every metric of ``trainer``'s own evaluation loop, named ``<prefix>_<metric>``, and logged.

    ``dataloader``: the one the raw evaluation just used (``eval_dataloader`` of ``on_evaluate``), so that
    ``trainer.evaluate(eval_dataset=...)`` and dict eval sets compare like with like; default: the
    trainer's eval set. Runs ``trainer.evaluation_loop`` rather than ``trainer.evaluate`` so that other
    callbacks do not receive a second ``on_evaluate`` (early stopping would see metrics without
    ``eval_loss``). TRL trainers accumulate extra metrics in ``trainer._metrics["eval"]``; they get the
    same prefix.
    """
    if dataloader is None:
        dataloader = trainer.get_eval_dataloader()
    output = trainer.evaluation_loop(dataloader, description=f"Evaluation of {prefix}", metric_key_prefix=prefix)
    metrics = dict(output.metrics)
    extra = getattr(trainer, "_metrics", None)
    if isinstance(extra, dict) and extra.get("eval"):
        for key, values in extra["eval"].items():
            if values:
                metrics[f"{prefix}_{key}"] = float(sum(values) / len(values))
        extra["eval"].clear()
    trainer.log(metrics)
    return metrics
