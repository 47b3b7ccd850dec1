"""The README's table of every config field, generated from the pydantic models.

    python -m trl_ema_plugin.config.flat_table > docs/config_table.md

One row per YAML key: its YAML spelling (Axolotl), its Python spelling (TRL: the keyword of
``WeightAveragingCallback`` / ``AveragerSpec`` / ``WeightAveragingConfig`` ...), the default, the
allowed values, which averaging methods use it, and the field's description.
"""

from __future__ import annotations

from typing import Any

from ..averagers.registry import registered_methods
from .averaging import FIELDS_OF_EVERY_METHOD, AveragerSpec, applicable_fields
from .fields import allowed_values
from .flat_keys import FAMILIES, FlatFamily, FlatKey

COLUMNS = ("YAML (Axolotl)", "Python (TRL)", "default", "allowed values", "methods", "description")


def table_rows() -> list[tuple[str, ...]]:
    rows = []
    for family, _ in FAMILIES.values():
        rows.append(_switch_row(family))
        for key in family.keys.values():
            rows.append(_key_row(key))
    return rows


def _switch_row(family: FlatFamily) -> tuple[str, ...]:
    model = family.models[0].__name__
    python = f"{model}.{family.switch_field}" if family.switch_field else f"{model}(...)"
    return (family.prefix, python, "unset (off)", family.switch_allowed(), "", family.description)


def _key_row(key: FlatKey) -> tuple[str, ...]:
    info = key.info
    description = (f"alias of `{key.alias_of}`; " if key.alias_of else "") + (info.description or "")
    return (
        key.yaml,
        key.python_spelling,
        "one, from the keys above"
        if info.is_required()
        else _default_text(info.get_default(call_default_factory=True)),
        allowed_values(key.model, key.python),
        _methods_using(key),
        description,
    )


def _methods_using(key: FlatKey) -> str:
    if key.model is not AveragerSpec:
        return ""
    if key.python in FIELDS_OF_EVERY_METHOD:
        return "all"
    return ", ".join(m for m in registered_methods() if key.python in applicable_fields(m))


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if value in ({}, []):
        return "{}" if value == {} else "[]"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def config_table_markdown() -> str:
    """The whole ``docs/config_table.md``."""
    lines = [
        "# Configuration keys",
        "",
        "Generated from the pydantic models by `python -m trl_ema_plugin.config.flat_table`; do not edit by hand.",
        "Axolotl reads the YAML spelling (top-level keys of the config, with",
        "`plugins: [trl_ema_plugin.integrations.axolotl.WeightAveragingPlugin]`); TRL users pass the Python",
        "spelling as keyword arguments of the callback or of the config object. A key left unset takes the",
        "default. `methods` lists the averaging methods that use a hyper-parameter; setting one that the",
        "chosen method does not use is an error.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in table_rows():
        yaml, python, *rest = row
        lines.append("| " + " | ".join([f"`{yaml}`", f"`{python}`", *(_cell(c) for c in rest)]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_table_markdown(), end="")
