"""The README's settings table is the generated one."""

from __future__ import annotations

from pathlib import Path

from trl_ema_plugin.config.flat_table import config_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_is_generated_from_the_models():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- config-table:start -->\n", "\n<!-- config-table:end -->"
    embedded = readme[readme.index(start) + len(start) : readme.index(end)]
    generated = config_table_markdown()
    rows = generated[generated.index("| YAML (Axolotl)") :].rstrip("\n")
    assert embedded == rows, (
        "README settings table is stale: copy the rows of python -m trl_ema_plugin.config.flat_table"
    )
