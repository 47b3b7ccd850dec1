"""DeepSpeed configs for the 2-rank CPU test scripts (one place for all of them)."""

from __future__ import annotations

from typing import Any


def zero_config(stage: int, persistence: str = "default") -> dict[str, Any]:
    """ZeRO-`stage` for CPU runs: small buckets (the defaults allocate gigabytes).

    ``persistence``: ``"default"`` leaves ``stage3_param_persistence_threshold`` out, so DeepSpeed's own
    100,000 applies and every LoRA tensor stays gathered between forwards; a number sets it (0: none does).
    """
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": 1_000_000}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size=1_000_000)
        if persistence != "default":
            zero["stage3_param_persistence_threshold"] = int(persistence)
    else:
        zero.update(allgather_bucket_size=1_000_000, overlap_comm=False, contiguous_gradients=True)
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 1_000_000,
    }
