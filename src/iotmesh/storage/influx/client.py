"""An async client of the InfluxDB HTTP API: line protocol writes, InfluxQL queries.

One client speaks to InfluxDB 1.x (`/write?db=`, `/query`, user/password as HTTP Basic
auth) and to InfluxDB 2.x/3.x (`/api/v2/write?org=&bucket=` with `Authorization: Token`,
and queries through the 1.x-compatible `/query?db=<bucket>`, which both serve). Only
1.x is run by the tests here; see docs/storage.md for what 2.x/3.x need.

Query results are asked for `chunked`, so a large answer streams as a series of JSON
documents (one per line) instead of one document held whole by the server.

Error handling (the BatchWriter retries `StorageError`, fails a sender on `PayloadError`):

    httpx.TransportError (refused, reset, timeout)   -> StorageError (retried)
    5xx                                              -> StorageError (retried)
    401 / 403 (credentials)                          -> StorageError (retried: a fixed
                                                        password lets the queue drain)
    404 on write (database or bucket missing)        -> DatabaseNotFound (a StorageError;
                                                        the store creates it again)
    400 on write, a server limit exceeded            -> StorageError (retried: devices
      (max-series-per-database, max-values-per-tag)     wait until the limit is raised)
    400 on write, other (points InfluxDB refuses)    -> PayloadError with InfluxDB's text
    a query's error (statement or response)          -> StorageError with InfluxDB's text

Resource handling: `open` creates the HTTP connection pool, `close` releases it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import InfluxSettings

CHUNK_SIZE = 10_000


class DatabaseNotFound(StorageError):
    """The database (1.x) or bucket (2.x) written to does not exist (HTTP 404)."""


class _Series(msgspec.Struct):
    name: str = ""
    tags: dict[str, str] | None = None
    columns: list[str] = []
    values: list[list[Any]] = []


class _Result(msgspec.Struct):
    statement_id: int = 0
    series: list[_Series] = []
    error: str | None = None


class _Response(msgspec.Struct):
    results: list[_Result] = []
    error: str | None = None


_decode = msgspec.json.Decoder(_Response).decode


@dataclass
class Series:
    """One series of a statement's result: its tags and rows (`columns` name the cells)."""

    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ServerInfo:
    """What `ping` found."""

    version: str
    build: str


class InfluxClient:
    """The HTTP API of one InfluxDB server, as the settings describe it."""

    def __init__(
        self, settings: InfluxSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._http: httpx.AsyncClient | None = None

    @property
    def database(self) -> str:
        """The database queries name: the 1.x database, or the 2.x/3.x bucket."""
        s = self.settings
        return s.database if s.version == 1 else s.bucket

    async def open(self) -> None:
        s = self.settings
        headers: dict[str, str] = {}
        auth: httpx.BasicAuth | None = None
        if s.version == 2 and s.token is not None:
            headers["Authorization"] = f"Token {s.token.get_secret_value()}"
        elif s.username is not None:
            password = s.password.get_secret_value() if s.password is not None else ""
            auth = httpx.BasicAuth(s.username, password)
        self._http = httpx.AsyncClient(
            base_url=s.url.rstrip("/"),
            headers=headers,
            auth=auth,
            timeout=s.timeout_s,
            transport=self._transport,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> InfluxClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._http is None:
            raise StorageError("InfluxDB client is not open")
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise StorageError(
                f"InfluxDB at {self.settings.url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code >= 500:
            raise StorageError(f"InfluxDB failed ({response.status_code}): {_error(response)}")
        if response.status_code in (401, 403):
            raise StorageError(
                f"InfluxDB refused the credentials ({response.status_code}): {_error(response)}"
            )
        return response

    async def ping(self) -> ServerInfo:
        """Check the server answers; return its version.

        Raises:
            StorageError: unreachable or not an InfluxDB.
        """
        response = await self._request("GET", "/ping")
        if response.status_code != 204:
            raise StorageError(f"{self.settings.url}/ping answered {response.status_code}")
        return ServerInfo(
            response.headers.get("X-Influxdb-Version", "unknown"),
            response.headers.get("X-Influxdb-Build", "unknown"),
        )

    async def write(self, body: bytes, precision: str = "ms") -> None:
        """Write line protocol; durable in InfluxDB's WAL when it returns.

        Args:
            body: lines, timestamps in `precision` units ("ms", or "ns" when a line
                needs a finer time, as the rollup markers do).

        Raises:
            PayloadError: InfluxDB refused the points (400).
            StorageError: anything else went wrong; the write may be retried as is
                (a point written twice is the same point).
        """
        if not body:
            return
        s = self.settings
        if s.version == 1:
            path, params = "/write", {"db": s.database, "precision": precision}
        else:
            params = {"bucket": s.bucket, "precision": precision}
            if s.org is not None:
                params["org"] = s.org
            path = "/api/v2/write"
        response = await self._request(
            "POST",
            path,
            params=params,
            content=body,
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        if response.status_code == 204:
            return
        if response.status_code == 400:
            reason = _error(response)
            if "limit exceeded" in reason:
                # A limit of the server (max-series-per-database, max-values-per-tag):
                # not the device's fault; retried until the operator raises it.
                raise StorageError(
                    f"InfluxDB refused new series: {reason} (raise the limit in its [data]"
                    " section, or set it to 0)"
                )
            raise PayloadError(f"InfluxDB refused the points: {reason}")
        if response.status_code == 404:
            raise DatabaseNotFound(f"InfluxDB write failed (404): {_error(response)}")
        raise StorageError(f"InfluxDB write failed ({response.status_code}): {_error(response)}")

    async def query(
        self, statements: Sequence[str], *, db: bool = True, epoch: str = "ms"
    ) -> list[list[Series]]:
        """Run InfluxQL statements in one request; return each one's series.

        Args:
            statements: InfluxQL statements, run in order.
            db: run them in the configured database (False for server-level ones).
            epoch: the unit of the times answered ("ms", or "ns").

        Raises:
            StorageError: the request or any statement failed.
        """
        data = {"q": ";\n".join(statements), "epoch": epoch, "chunked": "true"}
        data["chunk_size"] = str(CHUNK_SIZE)
        if db:
            data["db"] = self.database
        response = await self._request("POST", "/query", data=data)
        if response.status_code != 200:
            raise StorageError(
                f"InfluxDB query failed ({response.status_code}): {_error(response)}"
            )
        return _merge_chunks(response.content, len(statements))

    async def databases(self) -> list[str]:
        """The databases of the server (SHOW DATABASES)."""
        (result,) = await self.query(["SHOW DATABASES"], db=False)
        return [str(row[0]) for series in result for row in series.values]

    async def ensure_database(self) -> None:
        """1.x: create the configured database unless it exists (needs admin rights)."""
        if self.settings.version != 1:
            return
        if self.settings.database not in await self.databases():
            await self.query([f"CREATE DATABASE {ident(self.settings.database)}"], db=False)

    async def delete_v2(self, predicate: str, start_ms: int, end_ms: int) -> None:
        """2.x: delete points through /api/v2/delete (its /query cannot run DELETE)."""
        s = self.settings
        params = {"bucket": s.bucket}
        if s.org is not None:
            params["org"] = s.org
        body = {"start": _rfc3339(start_ms), "stop": _rfc3339(end_ms), "predicate": predicate}
        response = await self._request("POST", "/api/v2/delete", params=params, json=body)
        if response.status_code != 204:
            raise StorageError(
                f"InfluxDB delete failed ({response.status_code}): {_error(response)}"
            )


def _merge_chunks(content: bytes, n_statements: int) -> list[list[Series]]:
    """Join the chunked JSON documents into one list of series per statement."""
    out: list[list[Series]] = [[] for _ in range(n_statements)]
    last: list[tuple[tuple[tuple[str, str], ...], Series] | None] = [None] * n_statements
    for line in content.splitlines():
        if not line.strip():
            continue
        try:
            doc = _decode(line)
        except msgspec.DecodeError as exc:
            raise StorageError(f"InfluxDB sent an unreadable answer: {exc}") from exc
        if doc.error is not None:
            raise StorageError(f"InfluxDB query failed: {doc.error}")
        for result in doc.results:
            if result.error is not None:
                raise StorageError(f"InfluxDB query failed: {result.error}")
            i = result.statement_id
            if not 0 <= i < n_statements:
                raise StorageError(f"InfluxDB answered an unknown statement {i}")
            for s in result.series:
                tags = s.tags or {}
                key = tuple(sorted(tags.items()))
                previous = last[i]
                if previous is not None and previous[0] == key:
                    previous[1].values.extend(s.values)  # the next chunk of the same series
                    continue
                series = Series(tags, s.columns, s.values)
                out[i].append(series)
                last[i] = (key, series)
    return out


def _error(response: httpx.Response) -> str:
    header: str | None = response.headers.get("X-Influxdb-Error")
    if header:
        return header
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)[:300]
    return str(body)[:300]


def _rfc3339(ms: int) -> str:
    t = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(milliseconds=ms)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ident(name: str) -> str:
    """An InfluxQL identifier, double-quoted."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(value: str) -> str:
    """An InfluxQL string literal, single-quoted."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


__all__ = ["DatabaseNotFound", "InfluxClient", "Series", "ServerInfo", "ident", "literal"]
