"""JSON log lines: the fields a log aggregator needs, one line per record."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from iotmesh.core.logs import JsonFormatter, configure_logging, json_log_identity


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("iotmesh", "instance-1"))
    logger = logging.getLogger("iotmesh.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_the_identity(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.warning("two\nlines %d", 2)
    [line] = lines(stream)
    assert line["level"] == "WARNING"
    assert line["logger"] == "iotmesh.test.logs"
    assert line["message"] == "two\nlines 2"
    assert line["service"] == "iotmesh"
    assert line["instance"] == "instance-1"
    ts = str(line["ts"])
    assert ts.endswith("Z")
    assert len(ts) == len("2026-11-27T12:00:00.123Z")
    assert "trace_id" not in line
    assert "exc" not in line


def test_exceptions_are_kept_as_text(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("broken")
    except ValueError:
        logger.exception("it failed")
    [line] = lines(stream)
    assert line["message"] == "it failed"
    assert "Traceback" in str(line["exc"])
    assert "ValueError: broken" in str(line["exc"])


def test_a_record_inside_a_span_names_it(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logger.info("inside")
    logger.info("outside")
    inside, outside = lines(stream)
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside


def test_configure_logging_switches_the_root_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "json", service="svc")
        identity = json_log_identity()
        assert identity is not None
        assert identity[0] == "svc"
        configure_logging("warning", "text")
        assert json_log_identity() is None
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
