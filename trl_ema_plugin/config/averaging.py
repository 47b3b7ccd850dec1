"""Validated settings of the weight averaging: one model for Python, TRL and Axolotl.

``AveragerSpec`` describes one running average; ``WeightAveragingConfig`` a list of them
(the first one is the *primary*: it goes to ``averaged/``, the others to ``averaged-<name>/``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from ..averagers.power import SIGMA_REL_MAX
from ..averagers.registry import averager_class, hyperparameter_names, registered_methods
from .errors import NO_VALUE, SettingError, SettingsModel, did_you_mean, unknown_key
from .fields import allowed_values, keywords
from .presets import BEMA_PRESETS, PRESET_METHODS, preset_fields

#: Defaults of every averager hyper-parameter. BEMA/DEMA/OUEMA take TRL's ``BEMACallback``
#: defaults (``update_freq=400``), EMA and the power-function EMA update every step.
METHOD_DEFAULT_UPDATE_EVERY = {"ema": 1, "power_ema": 1}
TRL_DEFAULT_UPDATE_EVERY = 400
#: the fields of an ``AveragerSpec`` that every method takes (the others are hyper-parameters of some)
FIELDS_OF_EVERY_METHOD = frozenset({"method", "name", "update_every", "update_after", "options"})
AVERAGER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: ``bias_horizon`` that becomes the run's last step (``TrainerState.max_steps``) when training begins
RUN_LENGTH = "max_steps"


def applicable_fields(method: str) -> set[str]:
    """The ``AveragerSpec`` fields (and ``options`` names) that ``method`` uses."""
    preset = {"preset"} if method in PRESET_METHODS else set()
    return set(hyperparameter_names(method)) | FIELDS_OF_EVERY_METHOD | preset


def not_applicable(
    stray: Mapping[str, Any], method: str, allowed: str, names: Mapping[str, Any] | None = None
) -> SettingError:
    """``<key>=<value>[, ...]: does not apply to method=<method> (allowed: <allowed>)``: settings a method does not use.

    ``allowed`` says what the method takes instead; it may name fields as ``{placeholder}`` (``names``).
    """
    verb = "does" if len(stray) == 1 else "do"
    return SettingError(
        f"{verb} not apply to {{method}}={method!r}",
        settings=dict(sorted(stray.items())),
        allowed=allowed,
        names={"method": "method", **(names or {})},
    )


def check_fields_apply(given: Mapping[str, Any], method: str) -> None:
    """Refuse ``AveragerSpec`` fields (``given``: field → value) that ``method`` does not use, naming the ones it does."""
    stray = {f: v for f, v in given.items() if f not in applicable_fields(method)}
    if stray:
        takes = sorted(n for n in applicable_fields(method) - FIELDS_OF_EVERY_METHOD if n in AveragerSpec.model_fields)
        options = sorted(n for n in hyperparameter_names(method) if n not in AveragerSpec.model_fields)
        allowed = ["{takes}"] if takes else []
        allowed += [f"{{options}} with {', '.join(options)}"] if options else []
        raise not_applicable(
            stray,
            method,
            "; ".join(allowed) or "none: it takes no hyper-parameters",
            {"takes": takes, "options": "options"},
        )


def name_error(field: str, name: Any, pattern: re.Pattern[str], what: str) -> SettingError:
    """A name that does not match ``pattern`` (``what`` it becomes says why)."""
    return SettingError(f"not a valid name (it becomes {what})", field=field, value=name, allowed=pattern.pattern)


def averager_name(field: str, name: str | None, what: str) -> str | None:
    """``name`` (unset or a name that can label an averager: a metric infix and a folder), else a SettingError."""
    if name is not None and not AVERAGER_NAME_PATTERN.match(name):
        raise name_error(field, name, AVERAGER_NAME_PATTERN, what)
    return name


def unknown_choice(field: str, value: Any, allowed: list[str], what: str) -> SettingError:
    """``<field>=<value>: not <what>; did you mean <close>? (allowed: a | b | c)``."""
    close = did_you_mean(value, allowed)
    hint = f"; did you mean {close!r}?" if close else ""
    return SettingError(f"not {what}{hint}", field=field, value=value, allowed=" | ".join(allowed))


class AveragerSpec(SettingsModel):
    """One running average of the trainable weights.

    Cadence: ``start`` at step ``update_after`` (θ_0/EMA snapshot), then an update every
    ``update_every`` optimizer steps (alias ``update_freq``, TRL's name).
    """

    method: str = Field("ema", description="ema | bema | dema | ouema | power_ema, or a registered third-party name")
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
    bias_horizon: Annotated[float, Field(gt=0.0)] | Literal["max_steps"] | None = Field(
        None, description="H: α_t fades linearly to 0 at step H; max_steps: the run's last step (unset: TRL's α_t)"
    )
    preset: Literal["trl", "lora"] | None = Field(
        None,
        description="named BEMA settings (config/presets.py): trl = TRL's BEMACallback defaults; lora = κ 0.3, "
        "α_t faded to 0 at max_steps, an update every step (issue 11's LoRA study); keys set beside it win",
    )
    # power-function EMA (EDM2)
    sigma_rel: float = Field(
        0.05, gt=0.0, le=SIGMA_REL_MAX, description="relative width σ_rel of the power-function EMA (EDM2: 0.05, 0.10)"
    )
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
                    settings={"update_every": data["update_every"], "update_freq": data["update_freq"]},
                    allowed="one of them",
                    names={"update_every": "update_every", "update_freq": "update_freq"},
                )
            data = {k: v for k, v in data.items() if k != "update_every"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        """A known ``preset`` of a method it names settings for adds its fields (the ones set beside it win)."""
        if isinstance(data, dict) and data.get("preset") in BEMA_PRESETS and data.get("method") in PRESET_METHODS:
            data = {**data, **preset_fields(data["preset"], data)}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in registered_methods():
            raise unknown_choice("method", method, registered_methods(), "a registered averager")
        return method

    @field_validator("bias_horizon", mode="before")
    @classmethod
    def _steps_or_run_length(cls, horizon: Any) -> Any:
        """A number of steps > 0, ``"max_steps"`` or unset; one message for anything else (not one per type)."""
        number = isinstance(horizon, int | float) and not isinstance(horizon, bool)
        if horizon is None or horizon == RUN_LENGTH or (number and math.isfinite(horizon) and horizon > 0):
            return float(horizon) if number else horizon
        raise SettingError(
            "not a number of steps > 0 nor max_steps",
            field="bias_horizon",
            value=horizon,
            allowed=allowed_values(cls, "bias_horizon"),
        )

    @field_validator("name")
    @classmethod
    def _clean_name(cls, name: str | None) -> str | None:
        return averager_name("name", name, "a metric infix and a folder")

    @model_validator(mode="after")
    def _fields_apply_to_method(self) -> AveragerSpec:
        check_fields_apply({f: getattr(self, f) for f in self.model_fields_set}, self.method)
        warmup_shape = sorted({"inv_gamma", "power"} & self.model_fields_set)
        if warmup_shape and not self.use_ema_warmup:
            raise SettingError(
                f"shape{'s' if len(warmup_shape) == 1 else ''} the EMA warm-up, which is off",
                settings={f: getattr(self, f) for f in warmup_shape},
                allowed="with {use_ema_warmup}=True only",
                names={"use_ema_warmup": "use_ema_warmup"},
            )
        return self

    @model_validator(mode="after")
    def _options_are_extra_constructor_arguments(self) -> AveragerSpec:
        """``options`` carries a third-party averager's own arguments, never a field of this model."""
        fields = sorted(set(self.options) & set(type(self).model_fields))
        if fields:
            raise SettingError(
                f"sets {', '.join(fields)}: set them as keys of their own, where they are checked",
                field="options",
                value=self.options,
                allowed="arguments of a third-party averager that are not settings here",
            )
        accepted = sorted(set(hyperparameter_names(self.method)) - set(type(self).model_fields))
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            close = [c for c in (did_you_mean(u, accepted) for u in unknown) if c]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SettingError(
                f"{', '.join(unknown)} {'is not an argument' if len(unknown) == 1 else 'are not arguments'} "
                f"of {{method}}={self.method!r}{hint}",
                field="options",
                value=self.options,
                allowed=", ".join(accepted) or f"none: {self.method} takes no options",
                names={"method": "method"},
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

    def for_run(self, max_steps: int) -> AveragerSpec:
        """This spec with ``bias_horizon="max_steps"`` set to the run's ``max_steps`` (other specs as they are)."""
        if self.bias_horizon != RUN_LENGTH:
            return self
        if max_steps <= 0:
            raise SettingError(
                f"needs the run's length, but the trainer reports max_steps={max_steps}",
                field="bias_horizon",
                value=RUN_LENGTH,
                allowed="a number of steps > 0, or max_steps in a run whose length is known",
            )
        return self.model_copy(update={"bias_horizon": float(max_steps)})

    def build(self, live_weights_may_move: bool = False):  # -> Averager
        """Instantiate the averager this spec describes.

        An averager whose output reads θ at the last update (BEMA) keeps its own copy of it when the
        live weights can differ from that θ: updates sparser than steps, or ``live_weights_may_move``
        (the trainer loads the best checkpoint's weights at the end).
        """
        if self.bias_horizon == RUN_LENGTH:
            raise ValueError(
                f"bias_horizon={RUN_LENGTH!r} is the run's length: build the averager of spec.for_run(max_steps)"
            )
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

    averagers: list[AveragerSpec] = Field(
        min_length=1, strict=False, description="the first is the primary averager"
    )  # not strict: a tuple of specs is a list too; each spec is strict
    eval: bool = Field(True, description="also evaluate each averager: eval_<name>_loss beside eval_loss")
    offload: bool = Field(False, description="keep the shadow in CPU memory instead of the training device")
    save_checkpoints: bool = Field(True, description="write averager state + adapter into every checkpoint")
    export_at_end: bool = Field(True, description="write output_dir/averaged/ at train end")
    on_nonfinite: Literal["skip", "error"] = Field(
        "skip", description="trained weights with NaN or inf at an update: skip it (warned, counted) or raise"
    )

    @field_validator("averagers")
    @classmethod
    def _unique_names(cls, specs: list[AveragerSpec]) -> list[AveragerSpec]:
        labels = [s.label for s in specs]
        duplicated = sorted({x for x in labels if labels.count(x) > 1})
        if duplicated:
            entries = ", ".join(f"[{i}]" for i, label in enumerate(labels) if label in duplicated)
            raise SettingError(
                f"averager names must be unique; repeated: {', '.join(duplicated)} (entries {entries}; "
                "an unnamed averager is named after its method)",
                field="averagers",
                value=NO_VALUE,
                allowed="a distinct name in each entry",
            )
        return specs

    @classmethod
    def from_kwargs(
        cls, method: str | None = None, averagers: list[AveragerSpec | dict] | None = None, **kwargs: Any
    ) -> WeightAveragingConfig:
        """``method=..., decay=...`` (one averager) or ``averagers=[...]`` (several), plus top-level fields.

        ``device`` (TRL ``BEMACallback``'s argument) is accepted: ``"cpu"`` means ``offload=True``,
        any other device keeps the shadow on the training device.
        """
        spec_keywords = [kw.name for kw in keywords(AveragerSpec) if kw.name != "method"]
        accepted = ["method", "averagers", *spec_keywords, *(f for f in cls.model_fields if f != "averagers"), "device"]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ValueError("; ".join(unknown_key(k, kwargs[k], accepted) for k in unknown))
        if "device" in kwargs:
            kwargs["offload"] = _offload_of_device(kwargs.pop("device"), kwargs.pop("offload", NO_VALUE))
        top = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
        if averagers is not None:
            given = {"method": method, **kwargs} if method is not None else kwargs
            if given:
                raise SettingError(
                    "pass either averagers=[...] or method=... with its hyper-parameters, not both",
                    settings=given,
                    allowed=f"these keys inside each entry of averagers; beside it: {', '.join(top_fields(cls))}",
                )
            return cls(averagers=averagers, **top)
        spec = AveragerSpec(method=method or "ema", **kwargs)
        return cls(averagers=[spec], **top)

    @property
    def primary(self) -> AveragerSpec:
        return self.averagers[0]


def top_fields(config: type[WeightAveragingConfig]) -> list[str]:
    """The fields of the config beside its list of averagers."""
    return [f for f in config.model_fields if f != "averagers"]


def _offload_of_device(device: Any, offload: Any) -> bool:
    """TRL ``BEMACallback``'s ``device``: ``"cpu"`` keeps the average in CPU memory (``offload=True``)."""
    if offload is not NO_VALUE:
        raise SettingError(
            "pass either offload or TRL's device, not both",
            settings={"device": device, "offload": offload},
            allowed="one of them",
        )
    text = str(device) if type(device).__name__ == "device" else device  # a torch.device
    if not isinstance(text, str) or not text:
        raise SettingError(
            "not a device",
            field="device",
            value=device,
            allowed="'cpu' (offload), or the training device ('cuda', ...)",
        )
    return text == "cpu"
