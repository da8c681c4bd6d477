"""Which chunks of a series compaction merges: a pure function of the chunk list.

Rules (the reasons are in the module docstring of `tsdb.py`):

* Only *small* chunks (fewer than `chunk_max_points // 2` points) are merged; a big chunk
  is left alone and splits the series' chunks into runs of small ones.
* A merge takes chunks that are contiguous in write order (chunk id order) and the
  results reuse the ids of the merged chunks, so a merged point keeps its place in the
  "later write wins" order relative to every chunk that was not merged.
* The newest run grows each time batch rows become chunks. It is merged size-tiered:
  the newest `min_chunks` chunks, plus each older chunk of the run that is no bigger
  than everything selected after it. A point is therefore rewritten only when its
  chunk at least doubles, O(log chunk_max_points) times in all, not once per step.
* An older run (closed by a big write, or left by a delete) never grows again; it is
  merged whole, once, if that leaves fewer chunks (more chunks than value kinds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """What compaction needs to know of a chunk without reading its blobs."""

    id: int
    n: int
    kind: int
    min_ts: int
    max_ts: int


def plan(chunks: Sequence[ChunkMeta], max_points: int, min_chunks: int) -> list[list[int]]:
    """The groups of chunk ids to merge, each ascending.

    Args:
        chunks: every chunk of one series, in id order.
        max_points: the most points a chunk may hold.
        min_chunks: the fewest new chunks worth a merge of the newest run.
    """
    small = max_points // 2
    runs: list[list[ChunkMeta]] = []
    current: list[ChunkMeta] = []
    for chunk in chunks:
        if chunk.n < small:
            current.append(chunk)
        elif current:
            runs.append(current)
            current = []
    groups = [[c.id for c in run] for run in runs if len(run) > len({c.kind for c in run})]
    if current:
        newest = _tiered(current, min_chunks)
        if newest:
            groups.append(newest)
    return groups


def _tiered(run: list[ChunkMeta], min_chunks: int) -> list[int]:
    if len(run) < min_chunks:
        return []
    first = len(run) - min_chunks
    total = sum(c.n for c in run[first:])
    while first > 0 and run[first - 1].n <= total:
        first -= 1
        total += run[first].n
    return [c.id for c in run[first:]]
