"""The configuration table of docs/operations.md names every setting of ``Settings``,
and nothing that is not one (or one of the local stack's own variables)."""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import Settings

ROOT = Path(__file__).resolve().parents[1]

STACK_ONLY = {"REELSTREAM_LOCAL_BROKER"}
"""Read by the local stack's tools (``infra``), not by the services' ``Settings``."""


def documented() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def settings_variables() -> set[str]:
    return {
        str(field.validation_alias)
        for field in Settings.model_fields.values()
        if field.validation_alias is not None
    }


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = settings_variables() - documented()
    assert not missing, f"settings missing from docs/operations.md#configuration: {sorted(missing)}"


def test_the_table_names_only_settings() -> None:
    unknown = documented() - settings_variables() - STACK_ONLY
    assert not unknown, f"docs/operations.md#configuration names no such setting: {sorted(unknown)}"
