"""Validated settings of the moving DPO reference: the ``"ref"`` adapter as an average of the policy adapter.

Every field is flat (no nesting), so that Axolotl exposes each one as ``dpo_reference_<field>``.

Two update rules:

* an averager of the policy adapter (``method`` = ``bema``, ``ema``, ``dema``, ``ouema`` or a
  registered third-party name) with its hyper-parameters (names as in
  :class:`~trl_ema_plugin.config.AveragerSpec`), written into ``"ref"`` every ``ref_update_every``
  optimizer steps;
* ``method="tr_dpo"``: TR-DPO (Gorbatovski et al., arXiv 2404.09656) with TRL ``DPOConfig``'s names.
  Every τ = ``ref_model_sync_steps`` steps, ref ← α·θ + (1 − α)·ref with α = ``ref_model_mixup_alpha``.
  That is an EMA with decay 1 − α updated every τ steps; α = 1 is the hard update ref ← θ.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..averagers.registry import averager_class, registered_methods
from .averaging import AveragerSpec, resolve_update_freq_alias

TR_DPO = "tr_dpo"
#: TRL ``DPOConfig`` defaults of the TR-DPO fields
TRL_REF_MODEL_SYNC_STEPS = 512
TRL_REF_MODEL_MIXUP_ALPHA = 0.6

#: fields forwarded to :class:`AveragerSpec` (``None`` = that averager's default)
AVERAGER_FIELDS = (
    "update_every",
    "update_after",
    "decay",
    "use_ema_warmup",
    "inv_gamma",
    "power",
    "ema_power",
    "bias_power",
    "lag",
    "multiplier",
    "min_ema_multiplier",
    "options",
)
TR_DPO_FIELDS = ("ref_model_sync_steps", "ref_model_mixup_alpha")


def reference_methods() -> list[str]:
    """Allowed values of ``method``: every registered averager, plus ``tr_dpo``."""
    return [*registered_methods(), TR_DPO]


class DPOReferenceConfig(BaseModel):
    """How the DPO reference adapter ``"ref"`` follows the policy adapter ``"default"``.

    Hyper-parameters left at ``None`` take the averager's own default (see ``AveragerSpec``);
    setting one that the chosen ``method`` does not use is an error.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str = Field(
        "bema",
        description="reference update rule: bema | ema | dema | ouema (an average of the policy adapter), "
        "a registered third-party averager, or tr_dpo (TRL's TR-DPO hard/soft update)",
    )
    ref_update_every: int | None = Field(
        None,
        ge=1,
        description="optimizer steps between writes of the average into the 'ref' adapter; "
        "default: the averager's update_every. Not used by tr_dpo (its cadence is ref_model_sync_steps)",
    )
    # --- averager hyper-parameters (AveragerSpec's names; None = the method's default)
    update_every: int | None = Field(
        None, ge=1, description="optimizer steps between averager updates (alias update_freq); ema: 1, others: 400"
    )
    update_after: int | None = Field(
        None, ge=0, description="step at which averaging starts (default 0); the reference stays put before it"
    )
    decay: float | None = Field(None, gt=0.0, lt=1.0, description="ema: decay d in (0, 1) (default 0.999)")
    use_ema_warmup: bool | None = Field(None, description="ema: ramp the decay up as diffusers' EMAModel (default off)")
    inv_gamma: float | None = Field(None, gt=0.0, description="ema warm-up: 1 − (1 + n/inv_gamma)^−power (default 1)")
    power: float | None = Field(None, gt=0.0, description="ema warm-up power (default 2/3)")
    ema_power: float | None = Field(None, ge=0.0, description="bema: κ in β_t = (ρ + γt)^−κ (default 0.5)")
    bias_power: float | None = Field(None, ge=0.0, description="bema: η in α_t = (ρ + γt)^−η (default 0.2)")
    lag: float | None = Field(None, ge=0.0, description="bema: ρ, the schedule's virtual starting age (default 10)")
    multiplier: float | None = Field(None, gt=0.0, description="bema: γ, steps → schedule time (default 1)")
    min_ema_multiplier: float | None = Field(None, ge=0.0, le=1.0, description="bema: floor β_min of β_t (default 0)")
    options: dict[str, Any] | None = Field(None, description="extra keyword arguments of a third-party averager")
    # --- TR-DPO (TRL DPOConfig's names)
    ref_model_sync_steps: int | None = Field(
        None,
        ge=1,
        description=f"tr_dpo: τ, steps between reference updates (default {TRL_REF_MODEL_SYNC_STEPS}, as TRL)",
    )
    ref_model_mixup_alpha: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=f"tr_dpo: α in ref ← α·θ + (1 − α)·ref; 1.0 = hard update (default {TRL_REF_MODEL_MIXUP_ALPHA}, as TRL)",
    )
    # --- placement
    offload: bool = Field(False, description="keep the averager state in CPU memory instead of the training device")

    @model_validator(mode="before")
    @classmethod
    def _update_freq_alias(cls, data: Any) -> Any:
        return resolve_update_freq_alias(data)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method == TR_DPO:
            return method
        try:
            averager_class(method)
        except ValueError:
            raise ValueError(
                f"method={method!r} is not a reference update rule; allowed values: {' | '.join(reference_methods())}"
            ) from None
        return method

    @model_validator(mode="after")
    def _fields_apply_to_method(self) -> DPOReferenceConfig:
        given = {f for f in self.model_fields_set if getattr(self, f) is not None}
        if self.method == TR_DPO:
            stray = sorted(given & {*AVERAGER_FIELDS, "ref_update_every"})
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} do(es) not apply to method='tr_dpo'; it takes ref_model_sync_steps "
                    "(τ) and ref_model_mixup_alpha (α) only (or pick method=ema with decay=1−α)"
                )
            if self.offload and self.hard_update:
                raise ValueError(
                    "offload does not apply to the TR-DPO hard update (ref_model_mixup_alpha=1.0): it keeps no "
                    "averager state to offload"
                )
        else:
            stray = sorted(given & set(TR_DPO_FIELDS))
            if stray:
                raise ValueError(f"{', '.join(stray)} apply only to method='tr_dpo', not to method={self.method!r}")
            self.averager_spec()  # AveragerSpec's own checks (fields that do not apply to the method, ...)
        return self

    # ------------------------------------------------------------------------
    @property
    def is_tr_dpo(self) -> bool:
        return self.method == TR_DPO

    @property
    def mixup_alpha(self) -> float:
        """TR-DPO α (TRL's default when unset)."""
        return TRL_REF_MODEL_MIXUP_ALPHA if self.ref_model_mixup_alpha is None else self.ref_model_mixup_alpha

    @property
    def hard_update(self) -> bool:
        """TR-DPO with α = 1: ref ← θ, no averager state at all."""
        return self.is_tr_dpo and self.mixup_alpha == 1.0

    def averager_spec(self) -> AveragerSpec | None:
        """The averager whose output becomes the reference; None for the TR-DPO hard update."""
        if self.is_tr_dpo:
            if self.hard_update:
                return None
            # ref ← α·θ + (1 − α)·ref every τ steps = EMA with decay 1 − α, updated every τ steps from θ_0 = ref_0
            return AveragerSpec(
                method="ema",
                name="reference",
                decay=1.0 - self.mixup_alpha,
                update_every=self.sync_every,
                update_after=0,
            )
        values = {f: getattr(self, f) for f in AVERAGER_FIELDS if getattr(self, f) is not None}
        return AveragerSpec(method=self.method, name="reference", **values)

    @property
    def sync_every(self) -> int:
        """Optimizer steps between writes into the ``"ref"`` adapter."""
        if self.is_tr_dpo:
            return TRL_REF_MODEL_SYNC_STEPS if self.ref_model_sync_steps is None else self.ref_model_sync_steps
        if self.ref_update_every is not None:
            return self.ref_update_every
        spec = self.averager_spec()
        assert spec is not None
        return spec.cadence

    @property
    def starts_at(self) -> int:
        """First step whose average may be written into ``"ref"`` (the averager's ``update_after``)."""
        spec = self.averager_spec()
        return 0 if spec is None else spec.update_after

    def is_sync_step(self, step: int) -> bool:
        """Write the average into ``"ref"`` after optimizer step ``step``?"""
        return step > 0 and step >= self.starts_at and step % self.sync_every == 0

    def first_sync_step(self) -> int:
        every = self.sync_every
        first = max(every, self.starts_at)
        return -(-first // every) * every
