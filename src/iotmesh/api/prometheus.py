"""The Prometheus text exposition format (0.0.4), written from the services' counters.

Why not `prometheus_client`: iotmesh already counts everything in plain attributes
that `Service.stats()` reads (the hot path only does `+= 1`), so metrics are pulled at
scrape time and a whole library for ~100 lines of text output is not worth a runtime
dependency. The tests parse the output with `prometheus_client`'s own parser.

Naming: a service's `stats()` value `<key>` becomes `iotmesh_<service>_<key>`; a key
the service lists in `Service.stats_counters` is a counter and gets the `_total` suffix,
everything else is a gauge. A list or dict value becomes one sample per element,
labelled by the name `Service.stats_labels` gives it (`index` / `key` otherwise); a nested
dict without a label name is flattened into the name (`<key>_<sub>`). Booleans are
0/1; strings and None are left out (they are not measurements).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

Labels = tuple[tuple[str, str], ...]
Kind = Literal["counter", "gauge"]

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(text: str) -> str:
    """`text` as a valid metric name: other characters become `_`."""
    name = _INVALID_NAME.sub("_", text)
    return f"_{name}" if not name or name[0].isdigit() else name


def label_name(text: str) -> str:
    """`text` as a valid label name (no `__` prefix: that is reserved)."""
    name = _INVALID_LABEL.sub("_", text)
    if not name or name[0].isdigit():
        name = f"l_{name}"
    return f"l{name}" if name.startswith("__") else name


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def _escape_help(text: str) -> str:
    # Only backslash and newline have escapes; other control characters are blanked.
    return _CONTROL.sub(" ", text.replace("\\", "\\\\").replace("\n", "\\n"))


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (`NaN`, `+Inf`, `-Inf` for the odd ones)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Family:
    """One metric: its name, type, help text and samples."""

    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str, kind: Kind, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: dict[Labels, float] = {}

    def add(self, value: float, labels: Labels = ()) -> None:
        """Add a sample; a second one with the same labels is ignored."""
        self.samples.setdefault(labels, int(value) if isinstance(value, bool) else value)


class Registry:
    """Families collected for one scrape, in the order they were first named."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def family(self, name: str, kind: Kind, help_text: str) -> Family | None:
        """The family `name` (made on first use); None if the name is taken by another
        type (a clash after sanitizing names: the first one wins)."""
        name = metric_name(name)
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Family(name, kind, help_text)
        return family if family.kind == kind else None

    def add(self, name: str, kind: Kind, help_text: str, value: float, labels: Labels = ()) -> None:
        """Add one sample to the family `name`."""
        family = self.family(name, kind, help_text)
        if family is not None:
            family.add(value, labels)

    def add_stats(
        self,
        prefix: str,
        stats: Mapping[str, Any],
        counters: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        base: Labels = (),
    ) -> None:
        """Add a service's `stats()` as `<prefix>_<key>` families (module docstring)."""
        counter_keys = frozenset(counters)
        for key, value in stats.items():
            kind: Kind = "counter" if key in counter_keys else "gauge"
            help_text = f"{prefix} {key}"
            label = (labels or {}).get(key)
            self._add_value(f"{prefix}_{key}", kind, help_text, value, label, base)

    def _add_value(
        self, name: str, kind: Kind, help_text: str, value: Any, label: str | None, base: Labels
    ) -> None:
        if isinstance(value, bool):
            self.add(name, kind, help_text, int(value), base)
        elif isinstance(value, int | float):
            self.add(name, kind, help_text, value, base)
        elif isinstance(value, list | tuple):
            label_key = label_name(label or "index")
            for i, item in enumerate(value):
                if isinstance(item, int | float):
                    self.add(name, kind, help_text, item, (*base, (label_key, str(i))))
        elif isinstance(value, Mapping):
            for sub, item in value.items():
                if label is None:
                    self._add_value(f"{name}_{sub}", kind, help_text, item, None, base)
                elif isinstance(item, int | float):
                    labelled = (*base, (label_name(label), str(sub)))
                    self.add(name, kind, help_text, item, labelled)

    def render(self) -> str:
        """The exposition text of every family with at least one sample."""
        lines: list[str] = []
        for family in self._families.values():
            if not family.samples:
                continue
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for labels, value in family.samples.items():
                if labels:
                    text = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels)
                    lines.append(f"{family.name}{{{text}}} {format_value(value)}")
                else:
                    lines.append(f"{family.name} {format_value(value)}")
        return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
