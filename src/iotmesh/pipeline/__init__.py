"""The pipeline between bus and storage: decode → validate → store → latest values."""

from iotmesh.pipeline.latest import LatestValues
from iotmesh.pipeline.service import Pipeline
from iotmesh.pipeline.stages import Drop

__all__ = ["Drop", "LatestValues", "Pipeline"]
