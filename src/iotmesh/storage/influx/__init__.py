"""The InfluxDB time-series backend (1.x, and 2.x/3.x through the same protocol)."""

from iotmesh.storage.influx.client import InfluxClient, ServerInfo
from iotmesh.storage.influx.rollups import RollupJob
from iotmesh.storage.influx.store import InfluxTimeSeriesStore

__all__ = ["InfluxClient", "InfluxTimeSeriesStore", "RollupJob", "ServerInfo"]
