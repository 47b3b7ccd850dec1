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
from .errors import SettingError, did_you_mean, explain, raw_errors, unknown_key
from .fields import Keyword, Loc, accepted_names, is_model, keywords, spelled, strip_none
from .posthoc import PostHocEMAConfig
from .reference import ReferenceConfig, reference_methods


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
      (for messages); ``true`` means "on, defaults";
    * ``alias_prefixes``: earlier prefixes. Each spells the whole family again (``dpo_reference`` for
      ``rl_reference``, ``dpo_reference_lag`` for ``rl_reference_lag``); setting one setting in two spellings is an
      error naming both, and messages spell every key under the prefix the user wrote.
    """

    prefix: str
    models: tuple[type[BaseModel], ...]
    description: str
    switch_field: str | None = None
    switch_values: Callable[[], list[str]] = list
    switch_noun: str = "true or false"
    alias_prefixes: tuple[str, ...] = ()

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
        for alias in self.alias_prefixes:
            for key in list(keys.values()):
                if key.yaml.startswith(f"{self.prefix}_"):
                    spelled_again = alias + key.yaml[len(self.prefix) :]
                    keys[spelled_again] = FlatKey(spelled_again, key.keyword, key.owner, key.alias_of or key.yaml)
        self.keys = keys

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The prefix, then the earlier ones."""
        return (self.prefix, *self.alias_prefixes)

    def prefix_of(self, yaml: str) -> str:
        """The prefix ``yaml`` is spelled with (the longest that fits, so that one may begin with another)."""
        fitting = [p for p in self.prefixes if yaml == p or yaml.startswith(f"{p}_")]
        return max(fitting, key=len) if fitting else self.prefix

    def spelling(self, written: Iterable[str] = ()) -> dict[str, str]:
        """Keyword (and the switch field) → the YAML key that names it in messages: the key the user wrote for it,
        else that keyword under the prefix of the user's switch (or of their first key)."""
        written = list(written)
        switches = [k for k in written if k in self.prefixes]
        first = switches[0] if switches else (written[0] if written else self.prefix)
        prefix = self.prefix_of(first)
        names = {
            k.argument: prefix + k.yaml[len(self.prefix) :]
            for k in self.keys.values()
            if k.yaml.startswith(f"{self.prefix}_")
        }
        names.update({self.keys[k].argument: k for k in written if k in self.keys})
        if self.switch_field:
            names[self.switch_field] = switches[0] if switches else prefix
        return names

    @property
    def root(self) -> type[BaseModel]:
        """The model the keys are validated by (the last of ``models``; the others are nested in it)."""
        return self.models[-1]

    def key(self, python_name: str) -> str:
        """``lambda_`` → ``self_distillation_lambda``: the trailing underscore of a keyword-named field goes."""
        return f"{self.prefix}_{python_name.rstrip('_')}"

    def spell(self, loc: Loc, entry: Loc = (), names: Mapping[str, str] | None = None) -> str:
        """An error location of :attr:`root` as the YAML key (``("averager", "lag")`` → ``rl_reference_lag``).

        ``entry``: a list entry that the keys fill directly (``("averagers", 0)`` for one averager); ``names``:
        keyword → YAML key (:meth:`spelling` of the keys the user wrote; default: this prefix).
        """
        names = names if names is not None else self.spelling()
        if entry and loc[: len(entry)] == entry:
            loc = loc[len(entry) :]
        text = spelled(self.root, loc, lambda keyword: names.get(keyword) or self.key(keyword))
        return text or names.get(self.switch_field or "", self.prefix)

    @property
    def all_keys(self) -> list[str]:
        return [*self.prefixes, *self.keys]

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
        starts = tuple(f"{p}_" for p in self.prefixes)
        return sorted(k for k in keys if isinstance(k, str) and k.startswith(starts) and k not in self.keys)

    def field_definitions(self) -> dict[str, tuple[Any, FieldInfo]]:
        """``create_model`` definitions: every key optional (``None`` = unset), constraints kept."""
        switch_type = Union[str, bool] if self.switch_field else bool  # noqa: UP007
        definitions: dict[str, tuple[Any, FieldInfo]] = {
            self.prefix: (Optional[switch_type], Field(None, description=self.description))  # noqa: UP045
        }
        for alias in self.alias_prefixes:
            description = f"alias of {self.prefix}: {self.description}"
            definitions[alias] = (Optional[switch_type], Field(None, description=description))  # noqa: UP045
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
def _flat_error(
    exc: ValidationError, family: FlatFamily, entry: Loc = (), names: Mapping[str, str] | None = None
) -> ValueError:
    """A pydantic error of the Python config, each line naming the YAML key the user wrote (see ``errors.explain``).

    ``entry``: the list entry that the flat keys fill (``("averagers", 0)`` for one averager); inside a list the
    user wrote as YAML, the entry's own names are the keys (``weight_averaging_averagers[1].decay``). ``names``:
    :meth:`FlatFamily.spelling` of the keys the user wrote.
    """
    lines = explain(exc, family.models[-1], lambda loc: family.spell(loc, entry, names))
    return ValueError("; ".join(lines))


def _switch_error(family: FlatFamily, switch_key: str, switch: Any) -> SettingError:
    close = did_you_mean(switch, family.switch_values())
    hint = f"; did you mean {close!r}?" if close else ""
    return SettingError(
        f"not {family.switch_noun}{hint}", field=switch_key, value=switch, allowed=family.switch_allowed()
    )


def _one_spelling_each(family: FlatFamily, values: Mapping[str, Any]) -> None:
    """Refuse a setting given under two of its keys (an alias and its key, or two prefixes), naming both."""
    by_setting: dict[Any, list[str]] = {}
    for yaml in values:
        key = family.keys.get(yaml)
        setting = ("switch",) if key is None else (key.keyword.path[:-1], key.python)
        by_setting.setdefault(setting, []).append(yaml)
    for setting, given in by_setting.items():
        if len(given) < 2:
            continue
        canonical = family.prefix if setting == ("switch",) else family.key(setting[1])
        given.sort(key=lambda k: (k != canonical, family.prefixes.index(family.prefix_of(k)), k))
        aliases = "; ".join(f"{k} is an alias of {canonical}" for k in given if k != canonical)
        raise SettingError(
            f"set one of them, not both ({aliases})" if len(given) == 2 else f"set one of them ({aliases})",
            settings={k: values[k] for k in given},
            allowed=" or ".join(given),
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
    for prefix in (p for family, _ in FAMILIES.values() for p in family.prefixes):
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
        family = next((f for f, _ in FAMILIES.values() if key.startswith(f.prefixes)), None)
        candidates = family.all_keys if family is not None else our_keys()
        lines.append(unknown_key(key, cfg[key], candidates, suggestion))
    return ValueError("; ".join(lines))


# ----------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class Switched:
    """An enabled family's keys as the user wrote them: the switch (key and value) and the other keys' values."""

    key: str
    switch: Any
    values: dict[str, Any]

    def names(self, family: FlatFamily) -> dict[str, str]:
        """Keyword → the YAML key that names it in messages (:meth:`FlatFamily.spelling`)."""
        return family.spelling([self.key, *self.values])


def _switched_values(family: FlatFamily, cfg: Mapping[str, Any] | Any) -> Switched | None:
    """The keys of an enabled family, None when it is off; checks unknown keys and keys set twice."""
    if isinstance(cfg, Mapping):
        unknown = family.unknown(cfg.keys())
        if unknown:
            raise unknown_keys_error(unknown, cfg)
    values = family.pick(cfg)
    _one_spelling_each(family, values)
    switch_key = next((p for p in family.prefixes if p in values), None)
    switch = values.pop(switch_key, None) if switch_key is not None else None
    if switch is None:
        if values:
            prefix = family.prefix_of(sorted(values)[0])
            raise SettingError(
                f"set without {prefix}, which turns the feature on",
                settings=dict(sorted(values.items())),
                allowed=f"with {prefix}: {family.switch_allowed(off=False)}",
            )
        return None
    if switch is False:
        if values:
            message = f"{switch_key}: false turns the feature off; {', '.join(sorted(values))} unused"
            warnings.warn(message, UserWarning, stacklevel=3)
        return None
    if switch is not True and (not isinstance(switch, str) or switch not in family.switch_values()):
        raise _switch_error(family, switch_key, switch)
    return Switched(switch_key, switch, values)


def switch_setting(family: FlatFamily, cfg: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(the switch key the user wrote, its value) where one is set and not ``false``; None otherwise."""
    for key in family.prefixes:
        value = cfg.get(key)
        if value is not None and value is not False:
            return key, value
    return None


def config_from_flat(family: FlatFamily, cfg: Mapping[str, Any] | Any) -> BaseModel | None:
    """The config object of a one-model family (``family.root``), or None when the feature is off."""
    switched = _switched_values(family, cfg)
    if switched is None:
        return None
    kwargs = {family.keys[y].argument: v for y, v in switched.values.items()}
    if isinstance(switched.switch, str) and family.switch_field:
        kwargs[family.switch_field] = switched.switch
    return _validated(family, kwargs, names=switched.names(family))


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
    switch, values = switched.switch, switched.values
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


def _validated(
    family: FlatFamily, data: dict[str, Any], entry: Loc = (), names: Mapping[str, str] | None = None
) -> Any:
    """``family.root`` from ``data``; an error names the YAML keys (``entry``: the list entry the keys fill;
    ``names``: how the user spelled them)."""
    try:
        with raw_errors():
            return family.root.model_validate(data)
    except ValidationError as exc:
        raise _flat_error(exc, family, entry, names) from None


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


# -------------------------------------------------------------------------- RLHF reference
RL_REFERENCE = FlatFamily(
    prefix="rl_reference",
    models=(ReferenceConfig,),
    description=(
        "the rule that moves the RLHF reference (the 'ref' adapter; rl: dpo | ipo | kto | grpo | gdpo): an averager "
        "of the policy adapter (bema | ema | dema | ouema, or a registered name) or tr_dpo; true: bema; false or "
        "unset: off (TRL's frozen reference)"
    ),
    switch_field="method",
    switch_values=reference_methods,
    switch_noun="a reference update rule, true or false",
    alias_prefixes=("dpo_reference",),
)
#: the family under its earlier name
DPO_REFERENCE = RL_REFERENCE


def reference_config_from_flat(cfg: Mapping[str, Any] | Any) -> ReferenceConfig | None:
    """The :class:`ReferenceConfig` that ``rl_reference*`` keys (or their aliases ``dpo_reference*``) describe, or
    None when off."""
    return config_from_flat(RL_REFERENCE, cfg)


#: the function under its earlier name
dpo_reference_config_from_flat = reference_config_from_flat


# ------------------------------------------------------------------------- post-hoc EMA
POSTHOC_EMA = FlatFamily(
    prefix="posthoc_ema",
    models=(PostHocEMAConfig,),
    description=(
        "true: record power-function EMAs as snapshots in output_dir/posthoc/, to synthesize the EMA of any "
        "σ_rel after training (ema-export --posthoc-sigma-rel); false or unset: off"
    ),
)


def posthoc_ema_config_from_flat(cfg: Mapping[str, Any] | Any) -> PostHocEMAConfig | None:
    """The :class:`PostHocEMAConfig` that ``posthoc_ema*`` keys describe, or None when off."""
    return config_from_flat(POSTHOC_EMA, cfg)


# ----------------------------------------------------------------- registry and checks
#: every feature's keys, with the function that turns them into its config object
FAMILIES: dict[str, tuple[FlatFamily, Callable[[Any], Any]]] = {
    WEIGHT_AVERAGING.prefix: (WEIGHT_AVERAGING, weight_averaging_config_from_flat),
    SELF_DISTILLATION.prefix: (SELF_DISTILLATION, self_distillation_config_from_flat),
    RL_REFERENCE.prefix: (RL_REFERENCE, reference_config_from_flat),
    POSTHOC_EMA.prefix: (POSTHOC_EMA, posthoc_ema_config_from_flat),
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
