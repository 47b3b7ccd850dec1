"""Validated settings of the post-hoc EMA recorder (EDM2): one model for Python, TRL and Axolotl.

The recorder keeps one power-function EMA per ``sigma_rels`` entry (EDM2: 0.05 and 0.10), each updated every
``update_every`` optimizer steps from step ``update_after`` on, and writes all of them (and the live weights θ,
with ``keep_weights``) to ``output_dir/posthoc/snapshot-<step>.safetensors`` every ``every`` steps and at the
last step. After training, the EMA of any σ_rel is synthesized from those files (``ema-export
--posthoc-sigma-rel``). Axolotl reads the same fields as flat keys ``posthoc_ema_<field>``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict, field_validator

from ..averagers.power import SIGMA_REL_MAX
from .errors import SettingError, SettingsModel

#: snapshots per run when ``every`` is unset: 16 snapshots of two profiles fit EDM2's profiles to ~1e-3
SNAPSHOTS_PER_RUN = 20
SigmaRel = Annotated[float, Strict(), Field(gt=0.0, le=SIGMA_REL_MAX)]


class PostHocEMAConfig(SettingsModel):
    """Power-function EMAs of the trainable weights, saved as snapshots to choose the EMA length after training."""

    sigma_rels: list[SigmaRel] = Field(
        default_factory=lambda: [0.05, 0.10],
        min_length=1,
        strict=False,  # a tuple is a list too; each item is strict
        description="σ_rel of each recorded power-function EMA, 0 < σ_rel ≤ 1/√12 (EDM2 records 0.05 and 0.10)",
    )
    every: int | None = Field(
        None,
        ge=1,
        description=f"optimizer steps between snapshots; default: the run's steps / {SNAPSHOTS_PER_RUN} (and the last step)",
    )
    update_every: int = Field(1, ge=1, description="optimizer steps between updates of the EMAs")
    update_after: int = Field(0, ge=0, description="step τ at which the EMAs start (θ_0; their time t counts from τ)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the snapshot files (the EMAs themselves stay fp32)"
    )
    keep_weights: bool = Field(
        True, description="also write the live weights θ (each snapshot) and θ_0: post-hoc BEMA and the raw baseline"
    )
    offload: bool = Field(False, description="keep the EMAs in CPU memory instead of the training device")

    @field_validator("sigma_rels")
    @classmethod
    def _distinct(cls, sigma_rels: list[float]) -> list[float]:
        repeated = sorted({s for s in sigma_rels if sigma_rels.count(s) > 1})
        if repeated:
            raise SettingError(
                f"repeats {', '.join(map(str, repeated))}: each σ_rel is recorded once",
                field="sigma_rels",
                value=sigma_rels,
                allowed="distinct numbers > 0.0 and ≤ 1/√12",
            )
        return sigma_rels

    def snapshot_every(self, max_steps: int) -> int:
        """``every``, or about (``max_steps`` − ``update_after``) / :data:`SNAPSHOTS_PER_RUN` (at least 1)."""
        if self.every is not None:
            return self.every
        return max(1, round(max(max_steps - self.update_after, 0) / SNAPSHOTS_PER_RUN))


__all__ = ["SNAPSHOTS_PER_RUN", "PostHocEMAConfig"]
