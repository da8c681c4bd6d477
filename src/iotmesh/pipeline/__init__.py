"""The pipeline between bus and storage: decode → validate → store → latest values."""

from iotmesh.pipeline.latest import LatestCache, LatestValues
from iotmesh.pipeline.service import Pipeline
from iotmesh.pipeline.stages import Drop

__all__ = ["Drop", "LatestCache", "LatestValues", "Pipeline"]
