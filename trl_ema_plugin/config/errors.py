"""Errors that carry the settings they are about, so that each front end names them as the user spelled them.

A validator raises :class:`SettingError` with the Python field names it is about; pydantic keeps the exception
(``ctx["error"]``) and the location of the model that raised it. :func:`explain` turns every error of a
``ValidationError`` (ours and pydantic's own: type, range, unknown key) into one line, in one format:

    <key>=<value>: <what is wrong> (allowed: <values>)        one bad value
    <sentence naming each key>                                settings that do not go together

where a key is spelled by the front end: the Python keyword (``update_freq``, ``averagers[1].decay``) or the
YAML key (``weight_averaging_update_freq``). :class:`SettingsModel` does that for Python keywords.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from .fields import Loc, allowed_values, flattened_fields, keywords, nested_model, spelled, walk

_NO_VALUE = object()
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SettingError(ValueError):
    """A rejected setting.

    * ``field`` (+ ``value``): one bad value, shown as ``<field>=<value>: <problem> (allowed: <allowed>)``;
    * no ``field``: settings that do not go together; ``problem`` names each one by a ``{placeholder}``.

    ``names`` maps each ``{placeholder}`` of ``problem`` to a field name (or a list of them) of the model that
    raises the error; the front end spells them. Other braces in ``problem`` stay as they are.
    """

    def __init__(
        self,
        problem: str,
        *,
        field: str | None = None,
        value: Any = _NO_VALUE,
        allowed: str | None = None,
        names: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        self.problem = problem
        self.field = field
        self.value = value
        self.allowed = allowed
        self.names = dict(names or {})
        super().__init__(self.render(str))

    def render(self, spell: Callable[[str], str], subject: str | None = None) -> str:
        """The message with every field name spelled by ``spell`` (``subject``: the spelled ``field``)."""

        def replace(match: re.Match[str]) -> str:
            names = self.names.get(match.group(1))
            if names is None:
                return match.group(0)
            return spell(names) if isinstance(names, str) else ", ".join(spell(n) for n in names)

        text = _PLACEHOLDER.sub(replace, self.problem)
        if self.field is not None:
            text = f"{subject or spell(self.field)}{_shown(self.value)}: {text}"
        return text + (f" (allowed: {self.allowed})" if self.allowed else "")


def _shown(value: Any) -> str:
    """``=<value>``, except where there is none or it is a whole mapping or list."""
    return "" if value is _NO_VALUE or isinstance(value, (dict, list)) else f"={value!r}"


def explain(exc: ValidationError, model: type[BaseModel], spell: Callable[[Loc], str]) -> list[str]:
    """One line per error of ``exc`` (raised validating ``model``), keys spelled by ``spell(location)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, SettingError):
            lines.append(_setting_line(error, loc, model, spell))
        else:
            lines.append(_pydantic_line(err, loc, model, spell))
    return lines


def _setting_line(error: SettingError, loc: Loc, model: type[BaseModel], spell: Callable[[Loc], str]) -> str:
    where = loc[:-1] if error.field is not None and loc[-1:] == (error.field,) else loc  # the model that raised it
    top = spell(where) == spell(())  # the outer model, or one written flat: its names are the user's keys

    written_flat = flattened_fields(_entry_model(model, where))

    def name(field: str) -> str:
        if not top or field in written_flat:
            return field  # inside a list entry the entry's own names are the keys; a flat model is named as a whole
        return spell((*where, field))

    subject = spell((*where, error.field)) if error.field is not None else None
    text = error.render(name, subject)
    if error.field is None and spell(where):
        text = f"{spell(where)}: {text}"
    return text


def _pydantic_line(err: Any, loc: Loc, model: type[BaseModel], spell: Callable[[Loc], str]) -> str:
    key = spell(loc)
    message = str(err["msg"]).removeprefix("Value error, ")
    value = _NO_VALUE if err["type"] == "missing" or not loc else err.get("input")
    owner, field = walk(model, loc)
    allowed = allowed_values(owner, field) if owner is not None and field is not None else None
    if field is not None and loc[-1] != field:  # the user wrote an alias
        alias = f"{key} is an alias of {spell((*loc[:-1], field))}"
        allowed = f"{allowed}; {alias}" if allowed else alias
    if err["type"] == "extra_forbidden":
        entry = _entry_model(model, loc[:-1])
        names = [kw.name for kw in keywords(entry)] if entry is not None else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        message = "unknown key" + (f" (did you mean {spell((*loc[:-1], close[0]))}?)" if close else "")
        allowed = None if close else ", ".join(spell((*loc[:-1], n)) for n in names) or None
    text = f"{key}{_shown(value)}: {message}" if key else message
    return text + (f" (allowed: {allowed})" if allowed else "")


def _entry_model(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model whose keywords stand at ``loc`` (the outer model at ``()``, a list entry's model below it)."""
    if not loc:
        return model
    owner, field = walk(model, loc)
    return nested_model(owner, field)


# ------------------------------------------------------------------------------- Python front end
def python_spelling(model: type[BaseModel]) -> Callable[[Loc], str]:
    """Locations spelled as the keyword arguments of ``model`` (``averagers[1].decay``, ``lag``)."""
    return lambda loc: spelled(model, loc, str)


def python_error(exc: ValidationError, model: type[BaseModel]) -> ValidationError:
    """``exc`` again, each error one line that names the keyword as the user spelled it (see :func:`explain`)."""
    details = [
        InitErrorDetails(type=PydanticCustomError("invalid_setting", line), loc=(), input=None)
        for line in explain(exc, model, python_spelling(model))
    ]
    return ValidationError.from_exception_data(exc.title, details, hide_input=True)


_RAW_ERRORS: ContextVar[bool] = ContextVar("trl_ema_plugin_raw_errors", default=False)


@contextmanager
def raw_errors() -> Iterator[None]:
    """Inside: :class:`SettingsModel` raises pydantic's own errors (with their locations), for another front end."""
    token = _RAW_ERRORS.set(True)
    try:
        yield
    finally:
        _RAW_ERRORS.reset(token)


class SettingsModel(BaseModel):
    """A config model whose errors name the keyword, the value and the allowed values (:func:`explain`).

    Constructing (also ``model_validate``) or assigning raises a ``ValidationError`` (a ``ValueError``) with
    one such line per error, spelled as this model's keywords. Pydantic calls ``__init__`` for nested models
    too; those, and everything under :func:`raw_errors`, raise the raw errors for the outer one to explain.
    """

    def __init__(self, /, **data: Any) -> None:
        if _RAW_ERRORS.get():
            super().__init__(**data)
            return
        with raw_errors():
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise python_error(exc, type(self)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        """Assign with validation; a rejected value leaves the model as it was (pydantic keeps it otherwise)."""
        before, fields_set = dict(self.__dict__), set(self.model_fields_set)
        try:
            with raw_errors():
                super().__setattr__(name, value)
        except ValidationError as exc:
            self.__dict__.clear()
            self.__dict__.update(before)
            object.__setattr__(self, "__pydantic_fields_set__", fields_set)
            raise exc if _RAW_ERRORS.get() else python_error(exc, type(self)) from None
