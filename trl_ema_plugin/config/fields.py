"""What the config models accept, read from the models themselves: keywords, their locations, allowed values.

A model may write a nested model *flat*: ``ReferenceConfig(lag=2)`` sets ``averager.lag``. It says so in
``flattened_fields`` (field → the nested fields that the outer model sets itself, e.g. ``method``). Every front
end (Python keywords, Axolotl's flat YAML keys, error messages) reads the keywords from :func:`keywords`, so a
flattened field is spelled the same way everywhere.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import annotated_types
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

#: a pydantic error location: field names, aliases and list indices
Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Keyword:
    """One keyword a model accepts: a field, an alias of one, or a field of a flattened nested model."""

    name: str  # as the user writes it (``update_freq``)
    field: str  # the field it sets (``update_every``)
    model: type[BaseModel]  # the model that declares that field
    path: Loc  # where pydantic reports it, from the outer model (``("averager", "update_freq")``)

    @property
    def is_alias(self) -> bool:
        return self.name != self.field

    @property
    def info(self) -> FieldInfo:
        return self.model.model_fields[self.field]


def flattened_fields(model: type[BaseModel] | None) -> dict[str, tuple[str, ...]]:
    return getattr(model, "flattened_fields", {}) if model is not None else {}


def accepted_names(name: str, info: FieldInfo) -> list[str]:
    """The field name and its aliases (``AliasChoices``), canonical first."""
    alias = info.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
    return [name, *(c for c in choices if isinstance(c, str) and c != name)]


def keywords(model: type[BaseModel]) -> list[Keyword]:
    """Every keyword ``model`` accepts, in field order (an alias right after its field)."""
    out: list[Keyword] = []
    flattened = flattened_fields(model)
    for name, info in model.model_fields.items():
        if name in flattened:
            inner = nested_model(model, name)
            assert inner is not None, f"{model.__name__}.{name} is flattened but holds no model"
            for kw in keywords(inner):
                if kw.field not in flattened[name]:
                    out.append(Keyword(kw.name, kw.field, kw.model, (name, *kw.path)))
            continue
        out.extend(Keyword(n, name, model, (n,)) for n in accepted_names(name, info))
    return out


def strip_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return annotation


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def nested_model(model: type[BaseModel] | None, field: str | None) -> type[BaseModel] | None:
    """The model that ``model.field`` holds, directly or as list items (None for a plain value)."""
    if model is None or field not in model.model_fields:
        return None
    annotation = strip_none(model.model_fields[field].annotation)
    candidates = (annotation, *typing.get_args(annotation))
    return next((a for a in candidates if is_model(a)), None)


def field_named(model: type[BaseModel] | None, name: str) -> str | None:
    """The field that keyword ``name`` (a field name or an alias) sets in ``model``."""
    if model is None:
        return None
    for field, info in model.model_fields.items():
        if name in accepted_names(field, info):
            return field
    return None


def walk(model: type[BaseModel], loc: Loc) -> tuple[type[BaseModel] | None, str | None]:
    """(model, field) that an error location ends at; (None, None) where it leaves the models."""
    current: type[BaseModel] | None = model
    field: str | None = None
    for item in loc:
        if isinstance(item, int):
            continue
        if field is not None:
            current = nested_model(current, field)
        field = field_named(current, item)
        if field is None:
            return None, None
    return (current, field) if field is not None else (None, None)


def spelled(model: type[BaseModel], loc: Loc, spell_keyword: Callable[[str], str]) -> str:
    """An error location as the user writes it: the outer keyword by ``spell_keyword``, then ``.name``/``[i]``.

    Flattened fields vanish (``("averager", "lag")`` → ``lag``), and a nested field that the outer model sets
    itself is the outer one (``("averager", "method")`` → ``method``). The empty location spells as ``""``.
    """
    text = ""
    current: type[BaseModel] | None = model
    at_top = True
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
            continue
        flattened = flattened_fields(current)
        if at_top and item in flattened:
            current = nested_model(current, item)
            continue
        if at_top:
            text, at_top = spell_keyword(item), False
        else:
            text += f".{item}"
        current = nested_model(current, field_named(current, item))
    return text


# ------------------------------------------------------------------------ allowed values
_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "≤"),
)


def choices(model: type[BaseModel], name: str) -> list[str]:
    """The strings ``model.name`` takes, where it takes a fixed set (``allowed_choices()`` or a ``Literal``)."""
    declared = getattr(model, "allowed_choices", None)
    listed = declared(name) if declared is not None else None
    if listed:
        return list(listed)
    annotation = strip_none(model.model_fields[name].annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return []


def _bounds(metadata: list[Any]) -> list[str]:
    """``> 0.0``, ``≤ 1.0``... of a field's (or a list item's) constraints."""
    return [f"{sign} {getattr(m, attr)}" for m in metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)]


def _scalar(annotation: Any) -> tuple[str, list[Any]] | None:
    """(``number`` | ``integer`` | ``string``, constraints) of a plain or ``Annotated`` scalar type, else None."""
    metadata: list[Any] = []
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    names = {int: "integer", float: "number", str: "string"}
    return (names[annotation], metadata) if annotation in names else None


def allowed_values(model: type[BaseModel], name: str) -> str:
    """Human-readable allowed values of ``model.name``, from its type and constraints (``choices()`` if declared)."""
    declared = getattr(model, "allowed_choices", None)
    listed = declared(name) if declared is not None else None
    if listed:
        return " | ".join(listed)
    info = model.model_fields[name]
    annotation = strip_none(info.annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):  # e.g. a number of steps, or "max_steps"
        text = " | ".join(_describe_member(a) for a in typing.get_args(annotation))
    else:
        text = _describe(annotation, info.metadata)
    if info.annotation is not annotation:  # Optional
        text = f"{text}, or unset"
    return text


def _describe_member(annotation: Any) -> str:
    """One member of a union: ``number > 0.0`` of ``Annotated[float, Field(gt=0)]``, ``max_steps`` of a Literal."""
    scalar = _scalar(annotation)
    return _describe(annotation, []) if scalar is None else f"{scalar[0]} {' and '.join(_bounds(scalar[1]))}".rstrip()


def _describe(annotation: Any, metadata: list[Any]) -> str:
    """``number > 0.0``, ``true | false``, ``a | b``: one type and its bounds."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        text = "true | false"
    elif origin is typing.Literal:
        text = " | ".join(str(v) for v in typing.get_args(annotation))
    elif annotation in (int, float, str):
        text = {int: "integer", float: "number", str: "string"}[annotation]
    elif origin is dict or annotation is dict:
        text = "mapping"
    elif origin is list and is_model(typing.get_args(annotation)[0]):
        text = f"list of {typing.get_args(annotation)[0].__name__} mappings"
    elif origin is list and _scalar(typing.get_args(annotation)[0]) is not None:
        item, constraints = _scalar(typing.get_args(annotation)[0])
        text = " ".join([f"list of {item}s", " and ".join(_bounds(constraints))]).rstrip()
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = _bounds(metadata)
    if any(isinstance(m, annotated_types.MinLen) and m.min_length == 1 for m in metadata):
        text = f"non-empty {text}"
    if bounds:
        text = f"{text} {' and '.join(bounds)}"
    return text
