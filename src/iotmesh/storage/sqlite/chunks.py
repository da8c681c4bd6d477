"""Chunk encoding: the points of one series, of one value kind, packed into two blobs.

A chunk holds its points sorted by ts, each ts once. The `ts` blob is little-endian
int64; the `vals` blob depends on the kind:

    DOUBLE  float64 little-endian     LONG  int64 little-endian     BOOL  int8 (0/1)
    STRING  msgpack list of str       JSON  msgpack list of values (dict, list, None)

Fixed-width columns decode with `np.frombuffer`, which is a view, not a copy: reading a
chunk of 4096 doubles costs microseconds whatever its size.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from iotmesh.storage.points import Kind, Points
from iotmesh.storage.sqlite.compaction import ChunkMeta

ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(list[Any])


@dataclass(frozen=True, slots=True)
class Chunk:
    """One encoded chunk, ready to insert."""

    kind: Kind
    n: int
    min_ts: int
    max_ts: int
    ts: bytes | memoryview
    vals: bytes | memoryview


def encode_run(points: Points, kind: Kind, lo: int, hi: int) -> Chunk:
    """Encode points lo..hi, which are all of `kind`, as one chunk."""
    return Chunk(
        kind,
        hi - lo,
        int(points.ts[lo]),
        int(points.ts[hi - 1]),
        points.ts[lo:hi].astype("<i8", copy=False).tobytes(),
        encode_values(points, kind, lo, hi),
    )


def encode_values(points: Points, kind: Kind, lo: int, hi: int) -> bytes:
    """The `vals` blob of points lo..hi, which are all of `kind`."""
    if kind is Kind.DOUBLE:
        return points.doubles[lo:hi].astype("<f8", copy=False).tobytes()
    if kind is Kind.LONG:
        assert points.longs is not None
        return points.longs[lo:hi].astype("<i8", copy=False).tobytes()
    if kind is Kind.BOOL:
        assert points.longs is not None
        return points.longs[lo:hi].astype(np.int8).tobytes()
    assert points.objects is not None
    return ENCODER.encode(points.objects[lo:hi])


def encode_points(points: Points, max_points: int) -> list[Chunk]:
    """Encode sorted, unique points (of any kinds) into chunks of one kind each.

    Every chunk but the last of each kind holds exactly `max_points` points.
    """
    present = np.bincount(points.kinds, minlength=len(Kind)).nonzero()[0].tolist()
    chunks = []
    for code in present:
        kind = Kind(code)
        part = points
        if len(present) > 1:
            part = points.take(np.flatnonzero(points.kinds == code))
        for lo in range(0, len(part), max_points):
            chunks.append(encode_run(part, kind, lo, min(lo + max_points, len(part))))
    return chunks


_WIDTH = {Kind.DOUBLE: 8, Kind.LONG: 8, Kind.BOOL: 1}


def concat_chunks(
    metas: Sequence[ChunkMeta], blobs: Sequence[tuple[bytes, bytes]], max_points: int
) -> list[Chunk] | None:
    """Merge chunks by concatenating their blobs, if that is correct; else None.

    It is when the chunks hold one fixed-width kind and their ts ranges do not overlap
    (in-order data, the common case): then the merge is a sort of the chunks by
    `min_ts` and a join of bytes, with no decoding, and no duplicate to resolve.

    Args:
        metas: the chunks; blobs: their (ts, vals) blobs, in the same order.
    """
    kind = Kind(metas[0].kind)
    width = _WIDTH.get(kind)
    if width is None or any(m.kind != kind for m in metas):
        return None
    order = sorted(range(len(metas)), key=lambda i: metas[i].min_ts)
    if any(metas[a].max_ts >= metas[b].min_ts for a, b in pairwise(order)):
        return None
    ts = b"".join(blobs[i][0] for i in order)
    vals = b"".join(blobs[i][1] for i in order)
    total = len(ts) // 8
    out = []
    for lo in range(0, total, max_points):
        hi = min(lo + max_points, total)
        first, last = (
            struct.unpack_from("<q", ts, lo * 8)[0],
            struct.unpack_from("<q", ts, hi * 8 - 8)[0],
        )
        out.append(
            Chunk(kind, hi - lo, first, last, ts[lo * 8 : hi * 8], vals[lo * width : hi * width])
        )
    return out


def decode_ts(blob: bytes) -> npt.NDArray[np.int64]:
    """The timestamps of a chunk (a read-only view of the blob)."""
    return np.frombuffer(blob, "<i8").astype(np.int64, copy=False)


def decode(kind: int, ts_blob: bytes, vals: bytes) -> Points:
    """The points of one chunk."""
    ts = decode_ts(ts_blob)
    n = len(ts)
    kinds = np.full(n, kind, np.uint8)
    if kind == Kind.DOUBLE:
        doubles = np.frombuffer(vals, "<f8").astype(np.float64, copy=False)
        return Points(ts, kinds, doubles, None, None)
    if kind == Kind.LONG:
        longs = np.frombuffer(vals, "<i8").astype(np.int64, copy=False)
        return Points(ts, kinds, longs.astype(np.float64), longs, None)
    if kind == Kind.BOOL:
        longs = np.frombuffer(vals, "i1").astype(np.int64)
        return Points(ts, kinds, np.zeros(n, np.float64), longs, None)
    return Points(ts, kinds, np.zeros(n, np.float64), None, DECODER.decode(vals))
