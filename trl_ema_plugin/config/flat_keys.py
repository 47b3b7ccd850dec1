"""Flat, prefixed config keys (Axolotl's convention), generated from the pydantic config models.

One pydantic model per feature is the single source of truth. Each field becomes a YAML key
``<prefix>_<field>``, beside a *switch* key ``<prefix>`` that turns the feature on::

    weight_averaging: bema                 # AveragerSpec.method (ema | bema | dema | ouema | registered)
    weight_averaging_update_every: 1       # AveragerSpec.update_every (alias weight_averaging_update_freq)
    weight_averaging_lag: 2                # AveragerSpec.lag
    weight_averaging_eval: true            # WeightAveragingConfig.eval
    weight_averaging_averagers:            # several averagers: weight_averaging: true + a list
      - {name: ema_999, method: ema, decay: 0.999}

:func:`weight_averaging_config_from_flat` turns such keys (an Axolotl ``cfg``, a dict loaded
from YAML) into a :class:`WeightAveragingConfig`; :func:`flat_from_weight_averaging_config` is
its inverse. :func:`flat_args_model` builds the pydantic model Axolotl mixes into its config.
Errors name the YAML key and its allowed values. Nothing here imports Axolotl.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional, Union

import annotated_types
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from ..averagers.registry import hyperparameter_names, registered_methods
from .averaging import AveragerSpec, WeightAveragingConfig
from .distillation import SelfDistillationConfig
from .dpo_reference import DPOReferenceConfig, reference_methods


# --------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class FlatKey:
    """One YAML key and the field of the Python config it stands for."""

    yaml: str
    python: str  # field name
    model: type[BaseModel]
    argument: str  # keyword the model accepts for it: the field, or an alias (update_freq)
    alias_of: str | None = None  # YAML key this one is an alias of

    @property
    def info(self) -> FieldInfo:
        return self.model.model_fields[self.python]

    @property
    def python_spelling(self) -> str:
        alias = f" (alias {self.argument})" if self.alias_of else ""
        return f"{self.model.__name__}.{self.python}{alias}"


@dataclass
class FlatFamily:
    """The flat keys of one feature: a switch ``<prefix>`` plus ``<prefix>_<field>`` per field.

    * ``models``: read in order (their field names must not collide);
    * ``switch_field``: the field a string switch value sets (``weight_averaging: bema`` sets
      ``method``); ``switch_values`` its allowed strings; ``true`` means "on, defaults";
    * ``exclude``: ``(model, field)`` pairs with no key (the switch stands for them);
    * ``aliases``: alias keyword → field (``update_freq`` → ``update_every``), each its own key.
    """

    prefix: str
    models: tuple[type[BaseModel], ...]
    description: str
    switch_field: str | None = None
    switch_values: Callable[[], list[str]] = list
    exclude: frozenset[tuple[type[BaseModel], str]] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys: dict[str, FlatKey] = {}
        for model in self.models:
            for name in model.model_fields:
                if (model, name) in self.exclude:
                    continue
                yaml = self.key(name)
                if yaml in keys:
                    raise TypeError(
                        f"{yaml} would stand for both {keys[yaml].python_spelling} and {model.__name__}.{name}"
                    )
                keys[yaml] = FlatKey(yaml, name, model, argument=name)
                for alias in (a for a, canonical in self.aliases.items() if canonical == name):
                    keys[self.key(alias)] = FlatKey(self.key(alias), name, model, argument=alias, alias_of=yaml)
        self.keys = keys

    def key(self, python_name: str) -> str:
        """``lambda_`` → ``self_distillation_lambda``: the trailing underscore of a keyword-named field goes."""
        return f"{self.prefix}_{python_name.rstrip('_')}"

    @property
    def all_keys(self) -> list[str]:
        return [self.prefix, *self.keys]

    def switch_allowed(self) -> str:
        values = self.switch_values()
        return " | ".join([*values, "true", "false"]) if values else "true | false"

    def pick(self, cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
        """The family's keys that ``cfg`` sets (``None`` counts as unset, as in Axolotl)."""
        values = {}
        for yaml in self.all_keys:
            value = cfg.get(yaml) if isinstance(cfg, Mapping) else getattr(cfg, yaml, None)
            if value is not None:
                values[yaml] = value
        return values

    def unknown(self, keys: Iterable[Any]) -> list[str]:
        start = f"{self.prefix}_"
        return sorted(k for k in keys if isinstance(k, str) and k.startswith(start) and k not in self.keys)

    def field_definitions(self) -> dict[str, tuple[Any, FieldInfo]]:
        """``create_model`` definitions: every key optional (``None`` = unset), constraints kept."""
        switch_type = Union[str, bool] if self.switch_field else bool  # noqa: UP007
        definitions: dict[str, tuple[Any, FieldInfo]] = {
            self.prefix: (Optional[switch_type], Field(None, description=self.description))  # noqa: UP045
        }
        for yaml, key in self.keys.items():
            description = key.info.description or ""
            if key.alias_of:
                description = f"alias of {key.alias_of}: {description}"
            definitions[yaml] = (Optional[_loosened(key.info)], Field(None, description=description))  # noqa: UP045
        return definitions


def _strip_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _loosened(info: FieldInfo) -> Any:
    """The field's type with its constraints; a nested model becomes a mapping (validated on conversion)."""
    annotation = _strip_none(info.annotation)
    if typing.get_origin(annotation) is list and _is_model(typing.get_args(annotation)[0]):
        annotation = list[dict[str, Any]]
    elif _is_model(annotation):
        annotation = dict[str, Any]
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return annotation


# ------------------------------------------------------------------ allowed values text
_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "≤"),
)


def allowed_values(model: type[BaseModel], name: str) -> str:
    """Human-readable allowed values of ``model.name``, from its type and constraints."""
    if model is AveragerSpec and name == "method":
        return " | ".join(registered_methods())
    info = model.model_fields[name]
    annotation = _strip_none(info.annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        text = "true | false"
    elif origin is typing.Literal:
        text = " | ".join(str(v) for v in typing.get_args(annotation))
    elif annotation in (int, float, str):
        text = {int: "integer", float: "number", str: "string"}[annotation]
    elif origin is dict or annotation is dict:
        text = "mapping"
    elif origin is list and _is_model(typing.get_args(annotation)[0]):
        text = f"list of {typing.get_args(annotation)[0].__name__} mappings"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = [f"{sign} {getattr(m, attr)}" for m in info.metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)]
    if any(isinstance(m, annotated_types.MinLen) and m.min_length == 1 for m in info.metadata):
        text = f"non-empty {text}"
    if bounds:
        text = f"{text} {' and '.join(bounds)}"
    if info.annotation is not annotation:  # Optional
        text = f"{text}, or unset"
    return text


# ------------------------------------------------------------------------ error messages
def _value_error(key: str, message: str) -> ValueError:
    return ValueError(f"{key}: {message}")


def unknown_keys_error(unknown: list[str], family: FlatFamily) -> ValueError:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, family.all_keys, n=1)
        hints.append(key + (f" (did you mean {close[0]}?)" if close else ""))
    return ValueError(f"unknown key(s) {', '.join(hints)}; the {family.prefix} keys are: {', '.join(family.all_keys)}")


def _yaml_names(message: str, family: FlatFamily) -> str:
    """Spell the model's field names as YAML keys in a model-level message (``lag`` → ``weight_averaging_lag``).

    Names with an underscore are replaced wherever they stand alone; plain words before ``=``, as
    the message's first word (``beta applies only to ...``) or as an item of a comma list. The
    switch's field is the switch key (``method='bema'`` → ``dpo_reference='bema'``).
    """
    fields = {k.argument: k.yaml for k in family.keys.values()}
    if family.switch_field:
        fields[family.switch_field] = family.prefix

    def replace(match: re.Match[str]) -> str:
        word, start, end = match.group(1), match.start(), match.end()
        before, after = message[max(start - 2, 0) : start], message[end : end + 1]
        in_list = before in (", ", ": ") and after in (",", ";", "")
        unambiguous = "_" in word or after == "=" or start == 0 or in_list
        return fields[word] if word in fields and unambiguous else word

    return re.sub(r"(?<![\w.'\"])([A-Za-z_][A-Za-z0-9_]*)(?![\w'\"])", replace, message)


def _flat_error(
    exc: ValidationError, family: FlatFamily, list_field: str | None = None, nested: bool = False
) -> ValueError:
    """Re-raise a pydantic error of the Python config with the YAML keys the user wrote.

    ``list_field``: a list field (``averagers``) that the flat keys fill with one item (``nested``
    False) or that the user wrote as a YAML list (``nested`` True: ``weight_averaging_averagers[0].decay``).
    """
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        key, model, name = _locate(loc, family, list_field, nested)
        if not nested:  # inside a YAML list entry the Python names are the keys
            message = _yaml_names(message, family)
        shown = err.get("type") != "missing" and not isinstance(err.get("input"), (dict, list))
        allowed = allowed_values(model, name) if model is not None and name is not None else None
        value = f"={err['input']!r}" if shown and name else ""
        lines.append(f"{key}{value}: {message}" + (f" (allowed: {allowed})" if allowed else ""))
    return ValueError("; ".join(lines))


def _locate(loc: tuple[Any, ...], family: FlatFamily, list_field: str | None, nested: bool) -> tuple[str, Any, Any]:
    """(YAML key, model, field) of a pydantic error location."""
    parts = list(loc)
    if list_field is not None and parts[:1] == [list_field] and not nested:
        parts = parts[2:]  # averagers.0.decay -> decay (the flat single-averager form)
    if not parts:
        return family.prefix, None, None
    head = str(parts[0])
    flat = family.keys.get(family.key(head))
    if len(parts) == 1:
        return family.key(head), (flat.model if flat else None), (flat.python if flat else None)
    text = family.key(head) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts[1:])
    last = parts[-1]
    inner = next((m for m in _nested_models(flat) if isinstance(last, str) and last in m.model_fields), None)
    return text, inner, (last if inner else None)


def _nested_models(flat: FlatKey | None) -> list[type[BaseModel]]:
    if flat is None:
        return []
    annotation = _strip_none(flat.info.annotation)
    return [a for a in (annotation, *typing.get_args(annotation)) if _is_model(a)]


# ----------------------------------------------------------------------- conversion
def _switched_values(family: FlatFamily, cfg: Mapping[str, Any] | Any) -> tuple[Any, dict[str, Any]] | None:
    """(switch, {yaml: value}) of an enabled family, None when it is off; checks unknown keys and aliases."""
    if isinstance(cfg, Mapping):
        unknown = family.unknown(cfg.keys())
        if unknown:
            raise unknown_keys_error(unknown, family)
    values = family.pick(cfg)
    switch = values.pop(family.prefix, None)
    if switch is None:
        if values:
            raise _value_error(
                ", ".join(sorted(values)),
                f"set without {family.prefix}; add `{family.prefix}: ...` (allowed: {family.switch_allowed()})",
            )
        return None
    if switch is False:
        if values:
            message = f"{family.prefix}: false turns the feature off; {', '.join(sorted(values))} unused"
            warnings.warn(message, UserWarning, stacklevel=3)
        return None
    if switch is not True and (not isinstance(switch, str) or switch not in family.switch_values()):
        raise _value_error(family.prefix, f"{switch!r} is not allowed (allowed: {family.switch_allowed()})")
    for yaml in values:
        alias_of = family.keys[yaml].alias_of
        if alias_of is not None and alias_of in values:
            raise _value_error(f"{alias_of}, {yaml}", f"set one of them ({yaml} is an alias of {alias_of}), not both")
    return switch, values


def config_from_flat(family: FlatFamily, cfg: Mapping[str, Any] | Any) -> BaseModel | None:
    """The config object of a one-model family (``family.models[0]``), or None when the feature is off."""
    switched = _switched_values(family, cfg)
    if switched is None:
        return None
    switch, values = switched
    kwargs = {family.keys[y].argument: v for y, v in values.items()}
    if isinstance(switch, str) and family.switch_field:
        kwargs[family.switch_field] = switch
    try:
        return family.models[0](**kwargs)
    except ValidationError as exc:
        raise _flat_error(exc, family) from None


def flat_from_config(family: FlatFamily, config: BaseModel) -> dict[str, Any]:
    """Inverse of :func:`config_from_flat`: the switch plus every field that was set."""
    out: dict[str, Any] = {family.prefix: True}
    for name in sorted(config.model_fields_set):
        if name == family.switch_field:
            out[family.prefix] = getattr(config, name)
        else:
            out[family.key(name)] = getattr(config, name)
    return out


# -------------------------------------------------------------------- weight averaging
WEIGHT_AVERAGING = FlatFamily(
    prefix="weight_averaging",
    models=(AveragerSpec, WeightAveragingConfig),
    description=(
        "the averaging method (ema | bema | dema | ouema, or a registered name) of one averager; "
        "true with weight_averaging_averagers for several; false or unset: off"
    ),
    switch_field="method",
    switch_values=registered_methods,
    exclude=frozenset({(AveragerSpec, "method")}),
    aliases={"update_freq": "update_every"},
)
_COMMON_SPEC_FIELDS = {"name", "update_every", "update_after", "options"}


def weight_averaging_config_from_flat(cfg: Mapping[str, Any] | Any) -> WeightAveragingConfig | None:
    """The :class:`WeightAveragingConfig` that ``weight_averaging*`` keys describe, or None when off.

    ``cfg`` is an Axolotl config, a dict loaded from YAML, or any object with those attributes.
    Raises :class:`ValueError` naming the YAML key and its allowed values.
    """
    family = WEIGHT_AVERAGING
    switched = _switched_values(family, cfg)
    if switched is None:
        return None
    switch, values = switched
    top = {k.python: values.pop(y) for y, k in family.keys.items() if k.model is WeightAveragingConfig and y in values}
    spec = {family.keys[y].argument: v for y, v in values.items()}
    if switch is True:
        if "averagers" not in top:
            raise _value_error(
                family.prefix,
                f"true needs {family.key('averagers')} (a list of averager specs); for one averager write "
                f"`{family.prefix}: <method>` (allowed: {' | '.join(registered_methods())})",
            )
        if spec:
            keys = ", ".join(sorted(values))
            raise _value_error(keys, f"with {family.key('averagers')}, set hyper-parameters inside each list entry")
        try:
            return WeightAveragingConfig(**top)
        except ValidationError as exc:
            raise _flat_error(exc, family, list_field="averagers", nested=True) from None
    if "averagers" in top:
        raise _value_error(
            family.key("averagers"),
            f"needs `{family.prefix}: true`; the method goes in each entry (got {family.prefix}: {switch})",
        )
    own = hyperparameter_names(switch)
    stray = sorted(y for y, v in values.items() if family.keys[y].python not in own | _COMMON_SPEC_FIELDS)
    if stray:
        names = sorted(family.key(k) for k in own if k in AveragerSpec.model_fields)
        raise _value_error(
            ", ".join(stray),
            f"does not apply to {family.prefix}: {switch}; its hyper-parameters are {', '.join(names) or 'none'}",
        )
    try:
        return WeightAveragingConfig(averagers=[{"method": switch, **spec}], **top)
    except ValidationError as exc:
        raise _flat_error(exc, family, list_field="averagers") from None


def flat_from_weight_averaging_config(config: WeightAveragingConfig) -> dict[str, Any]:
    """The flat keys that describe ``config`` (the fields that were set): inverse of the above."""
    family = WEIGHT_AVERAGING
    if len(config.averagers) == 1:
        out = flat_from_config(family, config.primary)
        out[family.prefix] = config.primary.method
    else:
        entries = [{"method": s.method, **s.model_dump(mode="json", exclude_unset=True)} for s in config.averagers]
        out = {family.prefix: True, family.key("averagers"): entries}
    for name in sorted(config.model_fields_set - {"averagers"}):
        out[family.key(name)] = getattr(config, name)
    return out


# -------------------------------------------------------------------- self-distillation
SELF_DISTILLATION = FlatFamily(
    prefix="self_distillation",
    models=(SelfDistillationConfig,),
    description="true: add λ·τ²·D(student ‖ averaged teacher) to the loss (needs weight_averaging); false or unset: off",
    aliases={"weight": "lambda_"},
)


def self_distillation_config_from_flat(cfg: Mapping[str, Any] | Any) -> SelfDistillationConfig | None:
    """The :class:`SelfDistillationConfig` that ``self_distillation*`` keys describe, or None when off.

    The teacher is one of the averagers of ``weight_averaging``, so that feature must be on and
    ``self_distillation_teacher`` (when set) must name one of its averagers.
    """
    config = config_from_flat(SELF_DISTILLATION, cfg)
    if config is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        averaging = weight_averaging_config_from_flat(cfg)
    if averaging is None:
        raise _value_error(
            SELF_DISTILLATION.prefix,
            f"true needs {WEIGHT_AVERAGING.prefix}: <method> (the teacher is an averager; allowed: "
            f"{' | '.join(registered_methods())})",
        )
    names = [spec.label for spec in averaging.averagers]
    if config.teacher is not None and config.teacher not in names:
        raise _value_error(
            SELF_DISTILLATION.key("teacher"), f"{config.teacher!r} names no averager (allowed: {' | '.join(names)})"
        )
    return config


# ------------------------------------------------------------------------- DPO reference
DPO_REFERENCE = FlatFamily(
    prefix="dpo_reference",
    models=(DPOReferenceConfig,),
    description=(
        "the rule that moves DPO's 'ref' adapter: an averager of the policy adapter (bema | ema | dema | ouema, "
        "or a registered name) or tr_dpo; true: bema; false or unset: off (TRL's frozen reference)"
    ),
    switch_field="method",
    switch_values=reference_methods,
    exclude=frozenset({(DPOReferenceConfig, "method")}),
    aliases={"update_freq": "update_every"},
)


def dpo_reference_config_from_flat(cfg: Mapping[str, Any] | Any) -> DPOReferenceConfig | None:
    """The :class:`DPOReferenceConfig` that ``dpo_reference*`` keys describe, or None when off."""
    return config_from_flat(DPO_REFERENCE, cfg)


# ----------------------------------------------------------------- registry and checks
#: every feature's keys, with the function that turns them into its config object
FAMILIES: dict[str, tuple[FlatFamily, Callable[[Any], Any]]] = {
    WEIGHT_AVERAGING.prefix: (WEIGHT_AVERAGING, weight_averaging_config_from_flat),
    SELF_DISTILLATION.prefix: (SELF_DISTILLATION, self_distillation_config_from_flat),
    DPO_REFERENCE.prefix: (DPO_REFERENCE, dpo_reference_config_from_flat),
}


def check_flat_keys(cfg: Mapping[str, Any]) -> None:
    """Validate every feature's flat keys in ``cfg``, unknown ones included; ValueError names the key."""
    for family, convert in FAMILIES.values():
        unknown = family.unknown(cfg.keys())
        if unknown:
            raise unknown_keys_error(unknown, family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(cfg)


class FlatKeysValidation(BaseModel):
    """Base of the generated args model: checks the flat keys before field validation.

    Axolotl mixes the generated model into its own config model, so this validator sees the
    whole YAML; its name is prefixed so that it cannot shadow one of Axolotl's validators.
    """

    @model_validator(mode="before")
    @classmethod
    def _trl_ema_plugin_check_flat_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            check_flat_keys(data)
        return data


def flat_args_model(name: str = "TrlEmaPluginArgs", module: str | None = None) -> type[BaseModel]:
    """A pydantic model with every flat key of every feature (all optional: ``None`` = unset)."""
    definitions: dict[str, Any] = {}
    for family, _ in FAMILIES.values():
        definitions.update(family.field_definitions())
    return create_model(name, __base__=FlatKeysValidation, __module__=module or __name__, **definitions)
