"""Validated settings of the weight averaging: one model for Python, TRL and Axolotl.

``AveragerSpec`` describes one running average; ``WeightAveragingConfig`` a list of them
(the first one is the *primary*: it goes to ``averaged/``, the others to ``averaged-<name>/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from ..averagers.registry import averager_class, hyperparameter_names, registered_methods
from .errors import SettingError, SettingsModel

#: Defaults of every averager hyper-parameter. BEMA/DEMA/OUEMA take TRL's ``BEMACallback``
#: defaults (``update_freq=400``), EMA updates every step.
METHOD_DEFAULT_UPDATE_EVERY = {"ema": 1}
TRL_DEFAULT_UPDATE_EVERY = 400
#: the fields of an ``AveragerSpec`` that every method takes (the others are hyper-parameters of some)
FIELDS_OF_EVERY_METHOD = frozenset({"method", "name", "update_every", "update_after", "options"})
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def applicable_fields(method: str) -> set[str]:
    """The ``AveragerSpec`` fields (and ``options`` names) that ``method`` uses."""
    return set(hyperparameter_names(method)) | FIELDS_OF_EVERY_METHOD


def not_applicable(stray: Iterable[str], method: str, takes: str, names: dict[str, Any] | None = None) -> SettingError:
    """``<stray> do(es) not apply to method=<method>; <takes>``: the one message for settings a method does not use.

    ``takes`` says what the method takes instead; it may name fields as ``{placeholder}`` (``names``).
    """
    return SettingError(
        f"{{stray}} do(es) not apply to {{method}}={method!r}; {takes}",
        names={"stray": sorted(stray), "method": "method", **(names or {})},
    )


def check_fields_apply(fields: Iterable[str], method: str) -> None:
    """Refuse ``AveragerSpec`` fields that ``method`` does not use, naming the ones it does."""
    stray = set(fields) - applicable_fields(method)
    if stray:
        takes = sorted(n for n in hyperparameter_names(method) if n in AveragerSpec.model_fields)
        options = sorted(n for n in hyperparameter_names(method) if n not in AveragerSpec.model_fields)
        tail = "its hyper-parameters are: {takes}" if takes else "it takes none of these"
        tail += f" (in {{options}}: {', '.join(options)})" if options else ""
        raise not_applicable(stray, method, tail, {"takes": takes, "options": "options"})


class AveragerSpec(SettingsModel):
    """One running average of the trainable weights.

    Cadence: ``start`` at step ``update_after`` (θ_0/EMA snapshot), then an update every
    ``update_every`` optimizer steps (alias ``update_freq``, TRL's name).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str = Field("ema", description="ema | bema | dema | ouema, or a registered third-party name")
    name: str | None = Field(None, description="label in metrics and folders; defaults to the method")
    update_every: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("update_every", "update_freq"),
        description="optimizer steps between updates (alias update_freq); ema: 1, others: 400 (TRL)",
    )
    update_after: int = Field(0, ge=0, description="step τ at which averaging starts (θ_0 snapshot)")
    # EMA
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay d, in (0, 1)")
    use_ema_warmup: bool = Field(False, description="EMA: ramp the decay up as diffusers' EMAModel")
    inv_gamma: float = Field(1.0, gt=0.0, description="EMA warm-up: 1 − (1 + n/inv_gamma)^−power")
    power: float = Field(2 / 3, gt=0.0, description="EMA warm-up power")
    # BEMA, DEMA, OUEMA (TRL's BEMACallback names and defaults)
    ema_power: float = Field(0.5, ge=0.0, description="κ in β_t = (ρ + γt)^−κ")
    bias_power: float = Field(0.2, ge=0.0, description="η in α_t = (ρ + γt)^−η")
    lag: float = Field(10, ge=0.0, description="ρ, the schedule's virtual starting age")
    multiplier: float = Field(1.0, gt=0.0, description="γ, steps → schedule time")
    min_ema_multiplier: float = Field(0.0, ge=0.0, le=1.0, description="floor β_min of β_t")
    options: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments of a third-party averager"
    )

    @classmethod
    def allowed_choices(cls, field: str) -> list[str] | None:
        return registered_methods() if field == "method" else None

    @model_validator(mode="before")
    @classmethod
    def _update_freq_alias(cls, data: Any) -> Any:
        """TRL's ``update_freq`` is an alias of ``update_every``; both at once is an error."""
        if isinstance(data, dict) and "update_freq" in data and "update_every" in data:
            if data["update_every"] is not None:
                raise SettingError(
                    "pass either {update_every} or its alias {update_freq}, not both",
                    names={"update_every": "update_every", "update_freq": "update_freq"},
                )
            data = {k: v for k, v in data.items() if k != "update_every"}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        methods = registered_methods()
        if method not in methods:
            raise SettingError(
                f"not a registered averager; allowed values: {', '.join(methods)}", field="method", value=method
            )
        return method

    @field_validator("name")
    @classmethod
    def _clean_name(cls, name: str | None) -> str | None:
        if name is not None and not _NAME_PATTERN.match(name):
            raise SettingError(
                f"must match {_NAME_PATTERN.pattern} (it becomes a metric infix and a folder)", field="name", value=name
            )
        return name

    @model_validator(mode="after")
    def _fields_apply_to_method(self) -> AveragerSpec:
        check_fields_apply(self.model_fields_set, self.method)
        warmup_shape = sorted({"inv_gamma", "power"} & self.model_fields_set)
        if warmup_shape and not self.use_ema_warmup:
            raise SettingError(
                "{shape} shape(s) the EMA warm-up: set {use_ema_warmup}=True too",
                names={"shape": warmup_shape, "use_ema_warmup": "use_ema_warmup"},
            )
        return self

    @model_validator(mode="after")
    def _options_are_extra_constructor_arguments(self) -> AveragerSpec:
        """``options`` carries a third-party averager's own arguments, never a field of this model."""
        fields = sorted(set(self.options) & set(type(self).model_fields))
        if fields:
            raise SettingError(
                "{options} sets {fields}: set them as keys of their own, where they are checked",
                names={"options": "options", "fields": fields},
            )
        accepted = set(hyperparameter_names(self.method)) - set(type(self).model_fields)
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise SettingError(
                f"{{options}} {', '.join(unknown)} are not arguments of {{method}}={self.method!r}; "
                f"it takes: {', '.join(sorted(accepted)) or 'no extra options'}",
                names={"options": "options", "method": "method"},
            )
        return self

    # ------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.name or self.method

    @property
    def cadence(self) -> int:
        if self.update_every is not None:
            return self.update_every
        return METHOD_DEFAULT_UPDATE_EVERY.get(self.method, TRL_DEFAULT_UPDATE_EVERY)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments of the averager: its declared hyper-parameters, then ``options``."""
        names = hyperparameter_names(self.method)
        values = {n: getattr(self, n) for n in names if n in type(self).model_fields}
        return {**values, **self.options}

    def build(self, live_weights_may_move: bool = False):  # -> Averager
        """Instantiate the averager this spec describes.

        An averager whose output reads θ at the last update (BEMA) keeps its own copy of it when the
        live weights can differ from that θ: updates sparser than steps, or ``live_weights_may_move``
        (the trainer loads the best checkpoint's weights at the end).
        """
        cls = averager_class(self.method)
        kwargs = self.hyperparameters()
        if cls.output_reads_last_update:
            kwargs["keep_last_weights"] = self.cadence > 1 or live_weights_may_move
        return cls(**kwargs)

    def first_update_step(self) -> int:
        return self.update_after + self.cadence

    def is_update_step(self, step: int) -> bool:
        return step > self.update_after and (step - self.update_after) % self.cadence == 0


class WeightAveragingConfig(SettingsModel):
    """Every averager of a run and how the integrations use them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    averagers: list[AveragerSpec] = Field(min_length=1, description="the first is the primary averager")
    eval: bool = Field(True, description="also evaluate each averager: eval_<name>_loss beside eval_loss")
    offload: bool = Field(False, description="keep the shadow in CPU memory instead of the training device")
    save_checkpoints: bool = Field(True, description="write averager state + adapter into every checkpoint")
    export_at_end: bool = Field(True, description="write output_dir/averaged/ at train end")

    @field_validator("averagers")
    @classmethod
    def _unique_names(cls, specs: list[AveragerSpec]) -> list[AveragerSpec]:
        labels = [s.label for s in specs]
        duplicated = sorted({x for x in labels if labels.count(x) > 1})
        if duplicated:
            raise SettingError(f"averager names must be unique; repeated: {', '.join(duplicated)} (set name=...)")
        return specs

    @classmethod
    def from_kwargs(
        cls, method: str | None = None, averagers: list[AveragerSpec | dict] | None = None, **kwargs: Any
    ) -> WeightAveragingConfig:
        """``method=..., decay=...`` (one averager) or ``averagers=[...]`` (several), plus top-level fields.

        ``device`` (TRL ``BEMACallback``'s argument) is accepted: ``"cpu"`` means ``offload=True``,
        any other device keeps the shadow on the training device.
        """
        if "device" in kwargs:
            if "offload" in kwargs:
                raise ValueError("pass either offload or TRL's device argument, not both")
            kwargs["offload"] = str(kwargs.pop("device")) == "cpu"
        top = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
        if averagers is not None:
            if method is not None or kwargs:
                raise ValueError(
                    "pass either averagers=[...] or method=... with its hyper-parameters, not both "
                    f"(got method={method!r}, {sorted(kwargs)})"
                )
            return cls(averagers=averagers, **top)
        spec = AveragerSpec(method=method or "ema", **kwargs)
        return cls(averagers=[spec], **top)

    @property
    def primary(self) -> AveragerSpec:
        return self.averagers[0]
