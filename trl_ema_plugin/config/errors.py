"""Errors that carry the settings they are about, so that each front end names them as the user spelled them.

A validator raises :class:`SettingError` with the Python field names it is about; pydantic keeps the exception
(``ctx["error"]``) and the location of the model that raised it. :func:`explain` turns every error of a
``ValidationError`` (ours and pydantic's own: type, range, unknown key, missing) into one line, in one format:

    <key>=<value>[, <key>=<value>]: <what is wrong> (allowed: <values>)
    <key>=<value>: unknown key (did you mean <key>?)

where a key is spelled by the front end: the Python keyword (``update_freq``, ``averagers[1].decay``) or the
YAML key (``weight_averaging_update_freq``). :class:`SettingsModel` does that for Python keywords; its models are
strict (``True`` is no number, ``"0.9"`` no float, ``2.0`` no integer) and take finite numbers only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from .fields import Loc, allowed_values, choices, flattened_fields, keywords, nested_model, spelled, walk

#: a setting named without a value (``settings={"averager": NO_VALUE}``)
NO_VALUE: Any = object()
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHORT = 60  # a list or mapping is shown as the value when its repr is at most this long


class SettingError(ValueError):
    """A rejected setting, shown as ``<field>=<value>[, ...]: <problem> (allowed: <allowed>)``.

    * ``field`` + ``value``: one bad value; ``settings`` ({field: value}): several that do not go together;
      neither: the problem names its fields by ``{placeholder}``;
    * ``names`` maps each ``{placeholder}`` of ``problem`` and ``allowed`` to a field name (or a list of them) of
      the model that raises the error; the front end spells them. Other braces stay as they are.
    """

    def __init__(
        self,
        problem: str,
        *,
        field: str | None = None,
        value: Any = NO_VALUE,
        settings: Mapping[str, Any] | None = None,
        allowed: str | None = None,
        names: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        self.problem = problem
        self.settings = dict(settings or {})
        if field is not None:
            self.settings = {field: value, **self.settings}
        self.allowed = allowed
        self.names = dict(names or {})
        super().__init__(self.render(str))

    @property
    def field(self) -> str | None:
        """The one setting this error is about (None for several or none)."""
        return next(iter(self.settings)) if len(self.settings) == 1 else None

    def render(self, spell: Callable[[str], str], subject: Callable[[str], str] | None = None) -> str:
        """The message, placeholders spelled by ``spell``, the settings it is about by ``subject`` (default ``spell``)."""
        subject = subject or spell
        text = self._filled(self.problem, spell)
        if self.settings:
            head = ", ".join(f"{subject(f)}{shown(v)}" for f, v in self.settings.items())
            text = f"{head}: {text}"
        if self.allowed:
            text += f" (allowed: {self._filled(self.allowed, spell)})"
        return text

    def _filled(self, text: str, spell: Callable[[str], str]) -> str:
        def replace(match: re.Match[str]) -> str:
            names = self.names.get(match.group(1))
            if names is None:
                return match.group(0)
            return spell(names) if isinstance(names, str) else ", ".join(spell(n) for n in names)

        return _PLACEHOLDER.sub(replace, text)


def shown(value: Any) -> str:
    """``=<value>``; nothing where there is none, or where it is a long list or mapping."""
    if value is NO_VALUE:
        return ""
    text = repr(value)
    if isinstance(value, (dict, list, tuple)) and len(text) > _SHORT:
        return ""
    return f"={text}"


def did_you_mean(word: Any, candidates: Iterable[str], cutoff: float = 0.7) -> str | None:
    """The candidate closest to ``word`` (case and ``-``/``_`` ignored), if any is close enough."""
    if not isinstance(word, str):
        return None
    folded = {c.lower().replace("-", "_"): c for c in candidates}
    close = difflib.get_close_matches(word.lower().replace("-", "_"), list(folded), n=1, cutoff=cutoff)
    return folded[close[0]] if close else None


def unknown_key(key: str, value: Any, candidates: Sequence[str], suggest: str | None = None) -> str:
    """``<key>=<value>: unknown key (did you mean <suggest>?)``, or ``(allowed: <candidates>)`` with no suggestion."""
    suggest = suggest or did_you_mean(key, candidates)
    hint = f"(did you mean {suggest}?)" if suggest else f"(allowed: {', '.join(candidates)})"
    return f"{key}{shown(value)}: unknown key {hint}"


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
    field = error.field
    where = loc[:-1] if field is not None and loc[-1:] == (field,) else loc  # the model that raised it
    top = spell(where) == spell(())  # the outer model, or one written flat: its names are the user's keys
    written_flat = flattened_fields(_entry_model(model, where))

    def name(field: str) -> str:
        if not top or field in written_flat:
            return field  # inside a list entry the entry's own names are the keys; a flat model is named as a whole
        return spell((*where, field))

    text = error.render(name, lambda f: spell((*where, f)))
    if not error.settings and spell(where) and not top:
        text = f"{spell(where)}: {text}"
    return text


#: pydantic's type errors, completed with the type of what the user gave
_TYPE_ERRORS = ("int_type", "int_from_float", "float_type", "bool_type", "string_type", "dict_type", "list_type")
_EXPONENT_WITHOUT_DOT = re.compile(r"^([+-]?\d+)([eE][+-]?\d+)$")


def _kind(value: Any) -> str:
    for cls, text in ((bool, "a bool"), (int, "an integer"), (float, "a float"), (str, "a string")):
        if isinstance(value, cls):
            return text
    return "a mapping" if isinstance(value, Mapping) else "a list" if isinstance(value, (list, tuple)) else "null"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_hint(err: Any, value: Any) -> str:
    """What a type error adds to pydantic's sentence: the type given, and how to write a number that was a string."""
    if err["type"] not in _TYPE_ERRORS or value is NO_VALUE:
        return ""
    hint = f", got {_kind(value)}"
    if isinstance(value, str) and _is_number(value) and err["type"] in ("int_type", "float_type"):
        exponent = _EXPONENT_WITHOUT_DOT.match(value.strip())
        if exponent:  # PyYAML (YAML 1.1) reads a number in e-notation as a string unless its mantissa has a dot
            hint += f"; YAML reads {value} as a string: write {exponent.group(1)}.0{exponent.group(2)}"
        else:
            hint += f"; write {value} without quotes"
    return hint


def _pydantic_line(err: Any, loc: Loc, model: type[BaseModel], spell: Callable[[Loc], str]) -> str:
    key = spell(loc)
    value = NO_VALUE if err["type"] == "missing" or not loc else err.get("input")
    if err["type"] == "extra_forbidden":
        entry = _entry_model(model, loc[:-1])
        names = [spell((*loc[:-1], kw.name)) for kw in keywords(entry)] if entry is not None else []
        close = did_you_mean(str(loc[-1]), [kw.name for kw in keywords(entry)] if entry is not None else [])
        return unknown_key(key, value, names, spell((*loc[:-1], close)) if close else None)
    message = str(err["msg"]).removeprefix("Value error, ") + _type_hint(err, value)
    owner, field = walk(model, loc)
    allowed = allowed_values(owner, field) if owner is not None and field is not None else None
    entry = nested_model(owner, field) if loc and isinstance(loc[-1], int) else None
    if entry is not None:  # a list entry that is no mapping
        allowed = f"a mapping of {entry.__name__} keys"
    if err["type"] == "literal_error" and owner is not None and field is not None:
        close = did_you_mean(value, choices(owner, field))
        message += f"; did you mean {close!r}?" if close else ""
    if field is not None and isinstance(loc[-1], str) and loc[-1] != field:  # the user wrote an alias
        alias = f"{key} is an alias of {spell((*loc[:-1], field))}"
        allowed = f"{allowed}; {alias}" if allowed else alias
    text = f"{key}{shown(value)}: {message}" if key else message
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

    Strict: a number is an ``int`` or ``float`` (an ``int`` field takes no ``2.0``), never a ``bool`` or a
    string; a ``bool`` is ``True``/``False``; numbers are finite (no ``inf``, no ``nan``); unknown keywords
    are errors. Assignments are validated as construction is.

    Constructing (also ``model_validate``) or assigning raises a ``ValidationError`` (a ``ValueError``) with
    one such line per error, spelled as this model's keywords. Pydantic calls ``__init__`` for nested models
    too; those, and everything under :func:`raw_errors`, raise the raw errors for the outer one to explain.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

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
