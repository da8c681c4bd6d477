"""Architecture rules, checked on the source text with `ast` (nothing is imported).

- proto/ is sans-IO: no asyncio, socket, ssl or selectors.
- core/ is the bottom layer: of iotmesh it imports only iotmesh.core.
- bus/, storage/, cluster/ and engines/ sit below the edges: no iotmesh.api, cli,
  transports or app.
- engines/ (engine helpers shared by bus/ and cluster/) imports only iotmesh.core.

Every import counts, including ones inside functions or `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import iotmesh

PACKAGE = Path(iotmesh.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["iotmesh", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line, absolute module name) for every import in the file.

    `from a import b` yields both `a` and `a.b` (b may be a submodule), and relative
    imports are resolved against the file's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"


def sources(layer: str) -> list[Path]:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no sources under iotmesh/{layer}"
    return files


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(layer: str, forbidden: list[str], allowed: list[str] | None = None) -> list[str]:
    """Imports of `layer` inside a `forbidden` package and not inside an `allowed` one."""
    found = []
    for path in sources(layer):
        for line, name in sorted(imports(path)):
            if allowed is not None and any(within(name, ok) for ok in allowed):
                continue
            if any(within(name, bad) for bad in forbidden):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}")
    return found


def test_proto_is_sans_io() -> None:
    assert violations("proto", ["asyncio", "socket", "ssl", "selectors"]) == []


def test_core_imports_nothing_else_of_iotmesh() -> None:
    # `from iotmesh import x` yields "iotmesh" itself as well as "iotmesh.x"; only the
    # latter says which layer is used, so the bare package name is allowed through.
    found = [
        v
        for v in violations("core", ["iotmesh"], allowed=["iotmesh.core"])
        if not v.endswith("imports iotmesh")
    ]
    assert found == []


@pytest.mark.parametrize("layer", ["bus", "storage", "cluster", "engines"])
def test_inner_layers_do_not_import_the_edges(layer: str) -> None:
    edges = [
        "iotmesh.api",
        "iotmesh.cli",
        "iotmesh.transports",
        "iotmesh.app",
        "iotmesh.wiring",
        "iotmesh.serve",
    ]
    assert violations(layer, edges) == []


def test_engine_helpers_import_only_core() -> None:
    found = [
        v
        for v in violations("engines", ["iotmesh"], allowed=["iotmesh.core", "iotmesh.engines"])
        if not v.endswith("imports iotmesh")
    ]
    assert found == []


def test_checker_sees_every_kind_of_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "iotmesh"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import asyncio.events\n"
        "from ..api import app\n"
        "if TYPE_CHECKING:\n"
        "    from iotmesh.storage import writer\n"
        "def f():\n"
        "    import iotmesh.bus.memory\n"
        "    from . import errors\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert violations("core", ["asyncio"]) == ["iotmesh/core/bad.py:2: imports asyncio.events"]
    found = violations("core", ["iotmesh"], allowed=["iotmesh.core"])
    assert found == [
        "iotmesh/core/bad.py:3: imports iotmesh.api",
        "iotmesh/core/bad.py:3: imports iotmesh.api.app",
        "iotmesh/core/bad.py:5: imports iotmesh.storage",
        "iotmesh/core/bad.py:5: imports iotmesh.storage.writer",
        "iotmesh/core/bad.py:7: imports iotmesh.bus.memory",
    ]
