"""Validated settings of the moving DPO reference: the ``"ref"`` adapter as an average of the policy adapter.

Two update rules:

* an averager of the policy adapter (``method`` = ``bema``, ``ema``, ``dema``, ``ouema`` or a
  registered third-party name), an :class:`~trl_ema_plugin.config.AveragerSpec` whose fields are
  written flat (``DPOReferenceConfig(method="bema", lag=2)``, YAML ``dpo_reference_lag``), written
  into ``"ref"`` every ``ref_update_every`` optimizer steps;
* ``method="tr_dpo"``: TR-DPO (Gorbatovski et al., arXiv 2404.09656) with TRL ``DPOConfig``'s names.
  Every τ = ``ref_model_sync_steps`` steps, ref ← α·θ + (1 − α)·ref with α = ``ref_model_mixup_alpha``.
  That is an EMA with decay 1 − α updated every τ steps; α = 1 is the hard update ref ← θ.
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

from pydantic import Field, SerializationInfo, field_validator, model_serializer, model_validator

from ..averagers.registry import hyperparameter_names, registered_methods
from .averaging import AveragerSpec, check_fields_apply, not_applicable, unknown_choice
from .errors import NO_VALUE, SettingError, SettingsModel
from .fields import keywords

TR_DPO = "tr_dpo"
#: TRL ``DPOConfig`` defaults of the TR-DPO fields
TRL_REF_MODEL_SYNC_STEPS = 512
TRL_REF_MODEL_MIXUP_ALPHA = 0.6
TR_DPO_FIELDS = ("ref_model_sync_steps", "ref_model_mixup_alpha")
#: ``name`` of the averager (in its saved state)
REFERENCE_NAME = "reference"
#: the nested averager's fields that this model sets itself
_SET_HERE = ("method", "name")
_AVERAGER_FIELDS = frozenset(AveragerSpec.model_fields)


def reference_methods() -> list[str]:
    """Allowed values of ``method``: every registered averager, plus ``tr_dpo``."""
    return [*registered_methods(), TR_DPO]


@cache
def _averager_keywords() -> dict[str, str]:
    """Keyword → field of the averager settings written flat (``lag``, ``update_freq`` → ``update_every``, ...)."""
    return {kw.name: kw.field for kw in keywords(AveragerSpec) if kw.field not in _SET_HERE}


def _tr_dpo_takes_no(stray: dict[str, Any]) -> SettingError:
    """Settings (keyword → value) that TR-DPO does not use."""
    return not_applicable(
        stray,
        TR_DPO,
        "{tau} (τ), {alpha} (α), {offload}; or {method}='ema' with {decay}=1−α",
        {"tau": "ref_model_sync_steps", "alpha": "ref_model_mixup_alpha", "offload": "offload", "decay": "decay"},
    )


class DPOReferenceConfig(SettingsModel):
    """How the DPO reference adapter ``"ref"`` follows the policy adapter ``"default"``.

    The averager's settings are keywords of this model (``lag=2``, ``update_freq=4``), gathered into
    :attr:`averager`; left unset, they take the averager's own defaults. Setting one that the chosen
    ``method`` does not use is an error. ``model_dump`` writes them flat too, so a dump loads back.
    """

    #: ``averager`` is written flat; its ``method`` and ``name`` are set here
    flattened_fields: ClassVar[dict[str, tuple[str, ...]]] = {"averager": _SET_HERE}

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
    averager: AveragerSpec | None = Field(
        None, description="the averager whose output becomes the reference (None for tr_dpo); its fields are keywords"
    )
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

    @classmethod
    def allowed_choices(cls, field: str) -> list[str] | None:
        return reference_methods() if field == "method" else None

    @model_validator(mode="before")
    @classmethod
    def _gather_averager_settings(cls, data: Any) -> Any:
        """``lag=2, decay=None, ...`` → ``averager={"method": method, "name": "reference", "lag": 2}``.

        ``None`` means unset (a dump of this model, and of its older flat version, holds every field).
        """
        if not isinstance(data, dict):
            return data
        averager_keywords = _averager_keywords()
        flat = {k: v for k, v in data.items() if k in averager_keywords and v is not None}
        data = {k: v for k, v in data.items() if k not in averager_keywords}
        method = data.get("method", cls.model_fields["method"].default)
        if method == TR_DPO:
            if flat:
                raise _tr_dpo_takes_no(flat)
            return data
        if data.get("averager") is not None:
            if flat:
                raise SettingError(
                    "pass either averager=AveragerSpec(...) or its fields ({fields}), not both",
                    settings=flat,
                    allowed="one of them",
                    names={"fields": sorted(flat)},
                )
            return data
        if method in registered_methods():  # else the method's own check names it, and these have nowhere to go
            data["averager"] = {**flat, "method": method, "name": REFERENCE_NAME}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in reference_methods():
            raise unknown_choice("method", method, reference_methods(), "a reference update rule")
        return method

    @model_validator(mode="after")
    def _fields_apply_to_method(self) -> DPOReferenceConfig:
        given = {f: getattr(self, f) for f in self.model_fields_set if getattr(self, f) is not None}
        if self.method == TR_DPO:
            stray = {f: v for f, v in given.items() if f == "ref_update_every"}
            if self.averager is not None:  # name what it sets, where it sets anything
                own = self.averager.model_dump(exclude_unset=True, exclude=set(_SET_HERE))
                stray.update(own or {"averager": NO_VALUE})
            if stray:
                raise _tr_dpo_takes_no(stray)
            if self.offload and self.hard_update:
                raise SettingError(
                    "the TR-DPO hard update keeps no averager state to offload",
                    settings={"offload": self.offload, "ref_model_mixup_alpha": self.ref_model_mixup_alpha},
                    allowed="{offload}=False, or {alpha} < 1",
                    names={"offload": "offload", "alpha": "ref_model_mixup_alpha"},
                )
            return self
        stray = {f: v for f, v in sorted(given.items()) if f in TR_DPO_FIELDS}
        if stray:
            takes = ["ref_update_every", *sorted(n for n in hyperparameter_names(self.method) if n in _AVERAGER_FIELDS)]
            raise SettingError(
                f"{'applies' if len(stray) == 1 else 'apply'} only to {{method}}='tr_dpo', "
                f"not to {{method}}={self.method!r}",
                settings=stray,
                allowed="{takes}",
                names={"method": "method", "takes": takes},
            )
        if self.averager is None or self.averager.method != self.method:  # ``method`` assigned after construction
            own = {} if self.averager is None else self.averager.model_dump(exclude_unset=True, exclude=set(_SET_HERE))
            check_fields_apply(own, self.method)
            self.__dict__["averager"] = AveragerSpec(**own, method=self.method, name=REFERENCE_NAME)
        return self

    @model_serializer(mode="wrap")
    def _dump_flat(self, handler: Any, info: SerializationInfo) -> dict[str, Any]:
        """The averager's settings flat, as written (unset ones ``None``), in place of ``averager``."""
        data = handler(self)
        if "averager" not in data:
            return data
        spec = {} if self.averager is None else self.averager.model_dump(mode=info.mode, exclude_unset=True)
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key != "averager":
                out[key] = value
                continue
            for name in (f for f in AveragerSpec.model_fields if f not in _SET_HERE):
                if name in spec or not (info.exclude_unset or info.exclude_none):
                    out[name] = spec.get(name)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        """``config.lag = 2`` sets the averager's setting (checked there); TR-DPO has no averager to set."""
        field = _averager_keywords().get(name)
        if field is None:
            super().__setattr__(name, value)
        elif self.averager is None:
            raise _tr_dpo_takes_no({name: value})
        else:
            setattr(self.averager, field, value)

    def __getattr__(self, name: str) -> Any:
        """``config.lag``: an averager setting as given, ``None`` when unset (the fields this model had flat)."""
        if name in AveragerSpec.model_fields and name not in _SET_HERE:
            spec = self.__dict__.get("averager")
            return getattr(spec, name) if spec is not None and name in spec.model_fields_set else None
        return super().__getattr__(name)  # type: ignore[misc]

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
        if not self.is_tr_dpo:
            return self.averager
        if self.hard_update:
            return None
        # ref ← α·θ + (1 − α)·ref every τ steps = EMA with decay 1 − α, updated every τ steps from θ_0 = ref_0
        return AveragerSpec(
            method="ema",
            name=REFERENCE_NAME,
            decay=1.0 - self.mixup_alpha,
            update_every=self.sync_every,
            update_after=0,
        )

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
