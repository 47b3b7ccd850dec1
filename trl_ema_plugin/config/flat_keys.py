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
import typing
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from ..averagers.registry import registered_methods
from .averaging import AveragerSpec, WeightAveragingConfig, top_fields
from .distillation import SelfDistillationConfig
from .dpo_reference import DPOReferenceConfig, reference_methods
from .errors import SettingError, did_you_mean, explain, raw_errors, unknown_key
from .fields import Keyword, Loc, accepted_names, is_model, keywords, spelled, strip_none


# --------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class FlatKey:
    """One YAML key and the keyword of the Python config it stands for."""

    yaml: str
    keyword: Keyword
    owner: type[BaseModel]  # the model whose keyword it is (an outer model for a field written flat)
    alias_of: str | None = None  # YAML key this one is an alias of

    @property
    def python(self) -> str:
        """The field it sets."""
        return self.keyword.field

    @property
    def model(self) -> type[BaseModel]:
        """The model that declares the field."""
        return self.keyword.model

    @property
    def argument(self) -> str:
        """The keyword the owner accepts for it: the field, or an alias (``update_freq``)."""
        return self.keyword.name

    @property
    def info(self) -> FieldInfo:
        return self.keyword.info

    @property
    def python_spelling(self) -> str:
        alias = f" (alias {self.argument})" if self.alias_of else ""
        return f"{self.owner.__name__}.{self.python}{alias}"


@dataclass
class FlatFamily:
    """The flat keys of one feature: a switch ``<prefix>`` plus ``<prefix>_<keyword>`` per keyword.

    * ``models``: read in order (their keywords must not collide); every keyword of each (aliases and the
      fields of a nested model written flat included, see :func:`~.fields.keywords`) gets a key;
    * ``switch_field``: the field a string switch value sets (``weight_averaging: bema`` sets
      ``method``; it has no key of its own); ``switch_values`` its allowed strings, ``switch_noun`` what they are
      (for messages); ``true`` means "on, defaults".
    """

    prefix: str
    models: tuple[type[BaseModel], ...]
    description: str
    switch_field: str | None = None
    switch_values: Callable[[], list[str]] = list
    switch_noun: str = "true or false"

    def __post_init__(self) -> None:
        keys: dict[str, FlatKey] = {}
        for model in self.models:
            for keyword in keywords(model):
                if keyword.field == self.switch_field:
                    continue
                yaml = self.key(keyword.name)
                alias_of = self.key(keyword.field) if keyword.is_alias else None
                if yaml == alias_of:
                    continue  # the alias ``lambda`` of ``lambda_`` is the field's own key
                if yaml in keys:
                    raise TypeError(
                        f"{yaml} would stand for both {keys[yaml].python_spelling} and {model.__name__}.{keyword.name}"
                    )
                keys[yaml] = FlatKey(yaml, keyword, model, alias_of)
        self.keys = keys
        self._yaml = {k.argument: k.yaml for k in keys.values()}
        if self.switch_field:
            self._yaml[self.switch_field] = self.prefix

    @property
    def root(self) -> type[BaseModel]:
        """The model the keys are validated by (the last of ``models``; the others are nested in it)."""
        return self.models[-1]

    def key(self, python_name: str) -> str:
        """``lambda_`` → ``self_distillation_lambda``: the trailing underscore of a keyword-named field goes."""
        return f"{self.prefix}_{python_name.rstrip('_')}"

    def spell(self, loc: Loc, entry: Loc = ()) -> str:
        """An error location of :attr:`root` as the YAML key (``("averager", "lag")`` → ``dpo_reference_lag``).

        ``entry``: a list entry that the keys fill directly (``("averagers", 0)`` for one averager).
        """
        if entry and loc[: len(entry)] == entry:
            loc = loc[len(entry) :]
        text = spelled(self.root, loc, lambda keyword: self._yaml.get(keyword) or self.key(keyword))
        return text or self.prefix

    @property
    def all_keys(self) -> list[str]:
        return [self.prefix, *self.keys]

    def switch_allowed(self, off: bool = True) -> str:
        """The values of the switch (``off``: with ``false``)."""
        values = [*self.switch_values(), "true", *(["false"] if off else [])]
        return " | ".join(values)

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


def _loosened(info: FieldInfo) -> Any:
    """The field's type with its constraints; a nested model becomes a mapping (validated on conversion)."""
    annotation = strip_none(info.annotation)
    if typing.get_origin(annotation) is list and is_model(typing.get_args(annotation)[0]):
        annotation = list[dict[str, Any]]
    elif is_model(annotation):
        annotation = dict[str, Any]
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return annotation


# ------------------------------------------------------------------------ error messages
def _flat_error(exc: ValidationError, family: FlatFamily, entry: Loc = ()) -> ValueError:
    """A pydantic error of the Python config, each line naming the YAML key the user wrote (see ``errors.explain``).

    ``entry``: the list entry that the flat keys fill (``("averagers", 0)`` for one averager); inside a list the
    user wrote as YAML, the entry's own names are the keys (``weight_averaging_averagers[1].decay``).
    """
    lines = explain(exc, family.models[-1], lambda loc: family.spell(loc, entry))
    return ValueError("; ".join(lines))


def _switch_error(family: FlatFamily, switch: Any) -> SettingError:
    close = did_you_mean(switch, family.switch_values())
    hint = f"; did you mean {close!r}?" if close else ""
    return SettingError(
        f"not {family.switch_noun}{hint}", field=family.prefix, value=switch, allowed=family.switch_allowed()
    )


# ----------------------------------------------------------------------- unknown keys
#: how close an unknown key must be to one of ours (difflib ratio) to be taken for a misspelling of it
NEAR_KEY = 0.8
NEAR_PREFIX = 0.85


def our_keys() -> list[str]:
    """Every flat key of every feature (switches included)."""
    return [key for family, _ in FAMILIES.values() for key in family.all_keys]


def _looks_like_ours(key: str) -> bool:
    """``key`` starts with one of our prefixes, or with something close to one, or is close to one of our keys."""
    folded = key.lower().replace("-", "_")
    for family, _ in FAMILIES.values():
        prefix = family.prefix
        if folded == prefix or folded.startswith(f"{prefix}_"):
            return True
        heads = {folded[: len(prefix) + d] for d in (-1, 0, 1)}
        if any(difflib.SequenceMatcher(None, head, prefix).ratio() >= NEAR_PREFIX for head in heads):
            return True
    return bool(difflib.get_close_matches(folded, our_keys(), n=1, cutoff=NEAR_KEY))


def unknown_keys(cfg: Mapping[str, Any], known: Collection[str] = ()) -> list[str]:
    """Keys of ``cfg`` that look like ours (a prefix, or close to one of our keys) but are none of ours.

    ``known``: keys that another part of the config takes (Axolotl's own fields); they are never reported.
    """
    ours = set(our_keys())
    return [k for k in cfg if isinstance(k, str) and k not in ours and k not in known and _looks_like_ours(k)]


def unknown_keys_error(unknown: list[str], cfg: Mapping[str, Any]) -> ValueError:
    """``<key>=<value>: unknown key (did you mean <our key>?)`` per key (the family's keys where none is close)."""
    lines = []
    for key in unknown:
        suggestion = did_you_mean(key, our_keys(), cutoff=0.5)
        family = next((f for f, _ in FAMILIES.values() if key.startswith(f.prefix)), None)
        candidates = family.all_keys if family is not None else our_keys()
        lines.append(unknown_key(key, cfg[key], candidates, suggestion))
    return ValueError("; ".join(lines))


# ----------------------------------------------------------------------- conversion
def _switched_values(family: FlatFamily, cfg: Mapping[str, Any] | Any) -> tuple[Any, dict[str, Any]] | None:
    """(switch, {yaml: value}) of an enabled family, None when it is off; checks unknown keys and aliases."""
    if isinstance(cfg, Mapping):
        unknown = family.unknown(cfg.keys())
        if unknown:
            raise unknown_keys_error(unknown, cfg)
    values = family.pick(cfg)
    switch = values.pop(family.prefix, None)
    if switch is None:
        if values:
            raise SettingError(
                f"set without {family.prefix}, which turns the feature on",
                settings=dict(sorted(values.items())),
                allowed=f"with {family.prefix}: {family.switch_allowed(off=False)}",
            )
        return None
    if switch is False:
        if values:
            message = f"{family.prefix}: false turns the feature off; {', '.join(sorted(values))} unused"
            warnings.warn(message, UserWarning, stacklevel=3)
        return None
    if switch is not True and (not isinstance(switch, str) or switch not in family.switch_values()):
        raise _switch_error(family, switch)
    for yaml in values:
        alias_of = family.keys[yaml].alias_of
        if alias_of is not None and alias_of in values:
            raise SettingError(
                f"set one of them, not both ({yaml} is an alias of {alias_of})",
                settings={alias_of: values[alias_of], yaml: values[yaml]},
                allowed=f"{alias_of} or {yaml}",
            )
    return switch, values


def config_from_flat(family: FlatFamily, cfg: Mapping[str, Any] | Any) -> BaseModel | None:
    """The config object of a one-model family (``family.root``), or None when the feature is off."""
    switched = _switched_values(family, cfg)
    if switched is None:
        return None
    switch, values = switched
    kwargs = {family.keys[y].argument: v for y, v in values.items()}
    if isinstance(switch, str) and family.switch_field:
        kwargs[family.switch_field] = switch
    return _validated(family, kwargs)


def flat_from_config(family: FlatFamily, config: BaseModel) -> dict[str, Any]:
    """Inverse of :func:`config_from_flat`: the switch plus every keyword of ``config`` that was set."""
    out: dict[str, Any] = {family.prefix: True}
    if family.switch_field in config.model_fields_set:
        out[family.prefix] = getattr(config, family.switch_field)
    for yaml, key in family.keys.items():
        if key.owner is type(config) and not key.alias_of:
            holder = config
            for name in key.keyword.path[:-1]:  # a field written flat: read it in its nested model
                holder = getattr(holder, name)
            if holder is not None and key.python in holder.model_fields_set:
                out[yaml] = getattr(holder, key.python)
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
    switch_noun="a registered averager, true or false",
)
#: the list entry that ``weight_averaging: <method>`` and its keys fill
_ONE_AVERAGER = ("averagers", 0)


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
    beside_list = ", ".join(family.key(f) for f in top_fields(WeightAveragingConfig))
    if switch is True:
        if "averagers" not in top:
            raise SettingError(
                f"needs {family.key('averagers')} (a list of averagers); for one averager write "
                f"`{family.prefix}: <method>`",
                field=family.prefix,
                value=True,
                allowed=f"{family.prefix}: {' | '.join(registered_methods())}, or true with {family.key('averagers')}",
            )
        if spec:
            raise SettingError(
                f"with {family.key('averagers')}, set hyper-parameters inside each list entry",
                settings=dict(sorted(values.items())),
                allowed=f"beside {family.key('averagers')}: {beside_list}",
            )
        return _validated(family, top)
    if "averagers" in top:
        raise SettingError(
            f"needs `{family.prefix}: true`; the method goes in each entry (got {family.prefix}: {switch})",
            field=family.key("averagers"),
            value=top["averagers"],
            allowed=f"{family.prefix}: true with {family.key('averagers')}, or {family.prefix}: <method> without it",
        )
    return _validated(family, {"averagers": [{"method": switch, **spec}], **top}, entry=_ONE_AVERAGER)


def _validated(family: FlatFamily, data: dict[str, Any], entry: Loc = ()) -> Any:
    """``family.root`` from ``data``; an error names the YAML keys (``entry``: the list entry the keys fill)."""
    try:
        with raw_errors():
            return family.root.model_validate(data)
    except ValidationError as exc:
        raise _flat_error(exc, family, entry) from None


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
        raise SettingError(
            f"needs {WEIGHT_AVERAGING.prefix} (the teacher is an averager)",
            field=SELF_DISTILLATION.prefix,
            value=True,
            allowed=f"beside {WEIGHT_AVERAGING.prefix}: {' | '.join(registered_methods())} | true",
        )
    names = [spec.label for spec in averaging.averagers]
    if config.teacher is not None and config.teacher not in names:
        close = did_you_mean(config.teacher, names)
        raise SettingError(
            "names no averager" + (f"; did you mean {close!r}?" if close else ""),
            field=SELF_DISTILLATION.key("teacher"),
            value=config.teacher,
            allowed=" | ".join(names),
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
    switch_noun="a reference update rule, true or false",
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


def check_flat_keys(cfg: Mapping[str, Any], known: Collection[str] = ()) -> None:
    """Validate every feature's flat keys in ``cfg``; ValueError names the key.

    Keys that look like ours but are none of ours (``weight_averagin_decay``, ``dpo_refrence``) are errors with a
    did-you-mean, unless ``known`` holds them (the keys another part of the config takes).
    """
    unknown = unknown_keys(cfg, known)
    if unknown:
        raise unknown_keys_error(unknown, cfg)
    for _, convert in FAMILIES.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(cfg)


def known_keys(model: type[BaseModel]) -> set[str]:
    """The keys ``model`` takes: its fields and their aliases."""
    known = set()
    for name, info in model.model_fields.items():
        known.update(accepted_names(name, info))
        if isinstance(info.alias, str):
            known.add(info.alias)
    return known


def flat_args_model(
    name: str = "TrlEmaPluginArgs",
    module: str | None = None,
    checks: tuple[Callable[[Mapping[str, Any]], None], ...] = (),
    doc: str | None = None,
) -> type[BaseModel]:
    """A pydantic model with every flat key of every feature (all optional: ``None`` = unset).

    Before field validation it runs :func:`check_flat_keys` and then ``checks`` on the whole mapping. Axolotl
    mixes the model into its own config model, so they see the whole YAML before Axolotl drops the keys it
    does not know, and ``cls`` is the merged model: a key that looks like ours but is one of Axolotl's fields
    passes. The validator's name is prefixed so that it cannot shadow one of Axolotl's validators.
    """

    def _trl_ema_plugin_check_keys(cls: type[BaseModel], data: Any) -> Any:
        if isinstance(data, Mapping):
            check_flat_keys(data, known=known_keys(cls))
            for check in checks:
                check(data)
        return data

    definitions: dict[str, Any] = {}
    for family, _ in FAMILIES.values():
        definitions.update(family.field_definitions())
    validators = {"_trl_ema_plugin_check_keys": model_validator(mode="before")(classmethod(_trl_ema_plugin_check_keys))}
    model = create_model(name, __module__=module or __name__, __validators__=validators, **definitions)
    model.__doc__ = doc or model.__doc__
    return model
