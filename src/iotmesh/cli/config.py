"""`iotmesh config`: show the effective settings, and the reference of every key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from iotmesh.core.errors import ConfigError
from iotmesh.core.settings import Settings, load_settings

config_app = typer.Typer(help="Show settings and their reference.", no_args_is_help=True)


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def _type_name(info: FieldInfo) -> str:
    text = str(info.annotation)
    for noise in ("typing.", "pathlib.", "pydantic.types.", "iotmesh.core.settings."):
        text = text.replace(noise, "")
    return text.replace("<class '", "").replace("'>", "")


def _default(info: FieldInfo) -> str:
    if info.default_factory is list:
        return "[]"
    if info.default_factory is not None:
        return "~/.local/share/iotmesh" if "data_dir" in repr(info.default_factory) else "computed"
    # Paths (the Kubernetes service-account files) as the string a TOML file would hold.
    return json.dumps(info.default, default=str) if info.default is not None else "unset"


def settings_reference() -> str:
    """The Markdown table of every settings key (docs/configuration.md embeds it)."""
    rows = [
        "| key | environment | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for dotted, info in _fields(Settings):
        env = "IOTMESH_" + dotted.upper().replace(".", "__")
        desc = (info.description or "").replace("|", "\\|")
        kind = _type_name(info).replace("|", "\\|")
        rows.append(f"| `{dotted}` | `{env}` | {kind} | `{_default(info)}` | {desc} |")
    return "\n".join(rows) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "********"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@config_app.command("show")
def show(
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
) -> None:
    """Print the settings this machine would run with (secrets masked), as JSON."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(f"iotmesh: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(_plain(dict(settings)), indent=2, default=_model_dump))


def _model_dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(dict(value))
    return str(value)


@config_app.command("reference")
def reference() -> None:
    """Print the Markdown reference of every settings key."""
    typer.echo(settings_reference(), nl=False)
