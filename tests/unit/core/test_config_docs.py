"""docs/configuration.md documents every settings key, as the code defines it."""

from __future__ import annotations

from pathlib import Path

from iotmesh.cli.config import settings_reference

DOC = Path(__file__).parents[3] / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert settings_reference() in DOC.read_text(), (
        "docs/configuration.md is out of date: paste `iotmesh config reference` into it"
    )
