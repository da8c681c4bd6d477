"""PostgreSQL backends: the time-series store and the state store (asyncpg)."""

from iotmesh.storage.postgres.state import PostgresStateStore
from iotmesh.storage.postgres.timeseries import PostgresTimeSeriesStore

__all__ = ["PostgresStateStore", "PostgresTimeSeriesStore"]
