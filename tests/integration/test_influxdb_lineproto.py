"""Property test against a real influxd: any entity id, key and string value round-trips.

Line protocol has three escaping contexts (tags, string fields, the InfluxQL literals
queries name them with); hypothesis writes arbitrary text through all of them and reads
it back through every read path of the store.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotmesh.core.settings import InfluxSettings
from iotmesh.core.types import Order, TsPoint, TsRecord
from iotmesh.storage.influx import InfluxTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.influxd import InfluxServer

_databases = itertools.count()

# Surrogates cannot be encoded as UTF-8, so no client could send them.
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
values = st.one_of(
    text,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.dictionaries(text, st.one_of(text, st.integers(-100, 100), st.none()), max_size=3),
)


async def _round_trip(url: str, entity: str, records: dict[str, Any]) -> None:
    database = f"escaping_{next(_databases)}"
    store = InfluxTimeSeriesStore(InfluxSettings(url=url, database=database))
    await store.open()
    try:
        await store.write([SeriesWrite(entity, [TsRecord(1000, records)])])
        await store.write([SeriesWrite(entity + "-other", [TsRecord(1000, {"x": 1})])])
        got = await store.query(Query(entity, tuple(records), 0, 2000, order=Order.ASC))
        assert got == {k: [TsPoint(1000, v)] for k, v in records.items()}
        for key, value in got.items():
            assert type(value[0].value) is type(records[key])
        assert await store.keys(entity) == sorted(records)
        assert await store.latest(entity) == {k: TsPoint(1000, v) for k, v in records.items()}
        assert await store.delete(entity, list(records), 0, 2000) == len(records)
        assert await store.keys(entity) == []
        assert await store.keys(entity + "-other") == ["x"]
        await store.client.query([f'DROP DATABASE "{database}"'], db=False)
    finally:
        await store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entity=text, records=st.dictionaries(text, values, min_size=1, max_size=4))
def test_any_text_round_trips(influxd: InfluxServer, entity: str, records: dict[str, Any]) -> None:
    asyncio.run(_round_trip(influxd.url, entity, records))
