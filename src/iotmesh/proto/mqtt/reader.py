"""`MqttReader`: bytes in, packets out, incrementally (h11-style, sans-IO).

    reader = MqttReader(max_packet_size=1 << 20)     # server side: version from CONNECT
    reader.feed(data)                                 # whatever the socket gave
    while packets := reader.read_packets():           # loop: see "Errors are final"
        for packet in packets:
            handle(packet)

Rules:
- Bytes may arrive split anywhere and many packets per read; `next_packet` returns None
  until a whole packet is buffered.
- The buffer holds at most one incomplete packet of at most `max_packet_size` bytes
  (plus whatever `feed` added since the reader was last drained): a fixed header
  announcing a larger packet (total size, the v5 Maximum Packet Size meaning) raises
  `PacketTooLarge` at once, before the body arrives, so a peer cannot make us buffer
  256 MB by sending 5 bytes.
- The caller sets the pace: `next_packet` parses exactly one packet and leaves the
  rest of the buffer as it came, unparsed and unchecked, until asked for (bytes fed
  later queue behind it). A server that must stop taking a client's packets in the
  middle of a read (the client reached a limit) just stops asking; the packets it
  did not take cost their bytes, not parsed objects.
- Server side (`version=None`): the first packet must be CONNECT; its protocol level
  then decides how every later packet is parsed; a second CONNECT, or a packet only a
  server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP), is a protocol error. Client side,
  or in tests, pass `version=4|5` (or call `set_version`) and every type is accepted.
  A server also refuses Subscription Identifiers in a client's PUBLISH (v5 3.3.4).
- Fixed-header flags are checked exactly: PUBREL, SUBSCRIBE and UNSUBSCRIBE carry 0b0010,
  others 0 (PUBLISH: dup/QoS/retain, QoS 3 and DUP on QoS 0 refused).
- Errors are final: the reader raises the same error again on later calls, because the
  stream position is lost and MQTT offers no resynchronisation. `read_packets` first
  returns the good packets that came before the bad one, then raises on the next call -
  so call it until it returns [] (the loop above), or a bad packet at the end of a read
  goes unnoticed until more bytes arrive. `next_packet` raises as soon as it gets there.

Speed: PUBLISH is parsed inline in the read loop (no per-byte loops, no call per field,
properties only when v5 says there are some), and `read_packets` drains everything in
one call (`next_packet` costs ~0.1 µs more per packet). The buffer is `bytes` plus an
offset, not a bytearray: slicing `bytes` gives the payload `bytes` in one copy (a
bytearray needs two), and nothing is re-sliced per packet. Received chunks wait in a
list and are joined only when a header or a whole packet is there, so a big packet
arriving in small reads is copied O(n), not O(n^2).
"""

from __future__ import annotations

from collections.abc import Iterator

from .decoder import PARSERS
from .errors import MalformedPacket, MqttError, PacketTooLarge, ProtocolError
from .packets import Connect, Packet, Publish
from .properties import PUBLISH, Properties, decode_properties

MAX_PACKET_SIZE = 268_435_460  # 1 + 4 + the largest remaining length: the protocol limit

# Required low nibble of the first byte, per packet type; -1: PUBLISH (flags carry data);
# None: reserved type (0 always; 15 in v3.1.1 is refused by its parser).
_FLAGS: tuple[int | None, ...] = (None, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)
_SERVER_TO_CLIENT = frozenset({2, 9, 11, 13})
_NAMES = (
    "reserved",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
)


class MqttReader:
    """Incremental MQTT decoder for one connection.

    Args:
        max_packet_size: the largest packet (fixed header included) to accept.
        version: 4 or 5 to parse with that version from the start; None (server side)
            to require CONNECT first and take the version from it.
    """

    __slots__ = (
        "_buf",
        "_chunked",
        "_chunks",
        "_failed",
        "_pos",
        "_server",
        "_v5",
        "max_packet_size",
        "version",
    )

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE, *, version: int | None = None):
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2")
        self.max_packet_size = max_packet_size
        self._buf = b""  # the bytes being parsed, from offset _pos
        self._pos = 0
        self._chunks: list[bytes] = []  # received after _buf, joined only when needed
        self._chunked = 0
        self._failed: MqttError | None = None
        self.version: int | None = None
        self._v5 = False
        self._server = version is None
        if version is not None:
            self.set_version(version)

    def set_version(self, version: int) -> None:
        """Parse from now on as protocol level `version` (4 = v3.1.1, 5 = v5)."""
        if version != 4 and version != 5:
            raise ValueError(f"unsupported MQTT protocol level {version}")
        self.version = version
        self._v5 = version == 5

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buf) - self._pos + self._chunked

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (copied unless they are `bytes`)."""
        if data:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._chunked += len(data)

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None if more bytes are needed.

        Only that packet is parsed: the bytes after it stay buffered as they are.

        Raises:
            PacketTooLarge: the fixed header announces a packet over `max_packet_size`.
            UnsupportedProtocolVersion: CONNECT asks for a level other than 4 or 5.
            MalformedPacket, ProtocolError: the peer broke the protocol; close.
        """
        packets = self._read(1)
        return packets[0] if packets else None

    def read_packets(self) -> list[Packet]:
        """Every complete packet buffered now (the fastest way to drain the reader).

        If a packet is bad, those before it are returned first and the error is raised
        by the next call, so loop until it returns []. Raises as `next_packet`.
        """
        return self._read(-1)

    def __iter__(self) -> Iterator[Packet]:
        """Every complete packet buffered now, one by one."""
        while (packet := self.next_packet()) is not None:
            yield packet

    def _join(self, need: int) -> bool:
        """Make `need` bytes from `_pos` contiguous in `_buf`, if that many arrived.

        Joining only when a whole header or packet is there keeps the copying linear
        even when a large packet trickles in as many small reads.
        """
        buf = self._buf
        pos = self._pos
        if len(buf) - pos + self._chunked < need:
            return False
        if pos == len(buf) and len(self._chunks) == 1:
            self._buf = self._chunks[0]
        else:
            self._buf = b"".join([buf[pos:], *self._chunks])
        self._pos = 0
        self._chunks = []
        self._chunked = 0
        return True

    def _read(self, limit: int) -> list[Packet]:
        if self._failed is not None:
            raise self._failed
        out: list[Packet] = []
        buf = self._buf
        pos = self._pos
        size = len(buf)
        v5 = self._v5
        fast = self.version is not None  # PUBLISH may take the inline path
        server = self._server
        max_size = self.max_packet_size
        first = 0
        try:
            while len(out) != limit:
                if size - pos < 5 and self._chunked:  # the header may straddle reads
                    self._pos = pos
                    self._join(min(5, size - pos + self._chunked))
                    buf, pos = self._buf, 0
                    size = len(buf)
                if size - pos < 2:
                    break
                first = buf[pos]
                length = buf[pos + 1]
                start = pos + 2
                if length >= 0x80:
                    length, start = _long_length(buf, pos, size)
                    if start < 0:
                        break
                end = start + length
                if end - pos > max_size:
                    raise PacketTooLarge(end - pos, max_size, packet_type=first >> 4)
                if not fast or first >> 4 != 3:
                    self._check_header(first)
                if end > size:
                    self._pos = pos
                    if not self._join(end - pos):
                        break
                    buf, pos = self._buf, 0
                    size = len(buf)
                    continue  # parse the header again at the new offset
                if fast and first >> 4 == 3:
                    # -- PUBLISH, inline: the hot path -------------------------------
                    qos = (first >> 1) & 0x03
                    if qos == 3:
                        raise MalformedPacket("PUBLISH with QoS 3")
                    if start + 2 > end:
                        raise MalformedPacket("PUBLISH ends inside its topic name")
                    stop = start + 2 + ((buf[start] << 8) | buf[start + 1])
                    if stop > end:
                        raise MalformedPacket("PUBLISH ends inside its topic name")
                    try:
                        topic = buf[start + 2 : stop].decode()
                    except UnicodeDecodeError:
                        raise MalformedPacket("topic name is not well-formed UTF-8") from None
                    if "+" in topic or "#" in topic or "\x00" in topic:
                        raise MalformedPacket(f"invalid topic name {topic!r}")
                    if qos:
                        if stop + 2 > end:
                            raise MalformedPacket("PUBLISH ends inside its packet identifier")
                        packet_id: int | None = (buf[stop] << 8) | buf[stop + 1]
                        stop += 2
                        if not packet_id:
                            raise MalformedPacket("packet identifier 0")
                    elif first & 0x08:
                        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
                    else:
                        packet_id = None
                    if v5 and (stop >= end or buf[stop]):
                        props, stop = decode_properties(buf, stop, end, PUBLISH)
                        if not topic and props.topic_alias is None:
                            raise ProtocolError("empty topic name without a topic alias")
                        if server and 0x0B in props._v:  # v5 3.3.4: server to client only
                            raise ProtocolError("a client may not send Subscription Identifiers")
                    else:
                        props = _new_properties(Properties)
                        props._v = {}
                        if v5:
                            stop += 1
                        if not topic:
                            if v5:
                                raise ProtocolError("empty topic name without a topic alias")
                            raise MalformedPacket("empty topic name")
                    out.append(
                        Publish(
                            topic,
                            buf[stop:end],
                            qos,
                            bool(first & 0x01),
                            bool(first & 0x08),
                            packet_id,
                            props,
                        )
                    )
                else:
                    packet = PARSERS[first >> 4](buf, start, end, v5)
                    if server and type(packet) is Connect:
                        self.set_version(packet.protocol_level)
                        v5 = self._v5
                        fast = True
                    out.append(packet)
                pos = end
        except MqttError as exc:
            if isinstance(exc, ProtocolError) and exc.packet_type is None:
                exc.packet_type = first >> 4
            self._fail(exc, out)
        except (IndexError, ValueError, KeyError, OverflowError) as exc:  # a bug, not input
            self._fail(MalformedPacket(f"cannot parse: {exc!r}", packet_type=first >> 4), out)
        self._pos = pos
        return out

    def _fail(self, exc: MqttError, out: list[Packet]) -> None:
        """Remember the error for good; raise it now unless packets precede it."""
        self._failed = exc
        if not out:
            raise exc

    def _check_header(self, first: int) -> None:
        packet_type = first >> 4
        flags = _FLAGS[packet_type]
        if flags is None:
            raise MalformedPacket("reserved packet type 0")
        if flags >= 0 and first & 0x0F != flags:
            raise MalformedPacket(f"invalid fixed header flags for {_NAMES[packet_type]}")
        if self._server:
            if self.version is None:
                if packet_type != 1:
                    raise ProtocolError(f"expected CONNECT first, got {_NAMES[packet_type]}")
            elif packet_type == 1:
                raise ProtocolError("second CONNECT on one connection")
            elif packet_type in _SERVER_TO_CLIENT:
                raise ProtocolError(f"a client may not send {_NAMES[packet_type]}")


_new_properties = Properties.__new__


def _long_length(buf: bytes, pos: int, size: int) -> tuple[int, int]:
    """Remaining length of 2..4 bytes: (length, body start), or (0, -1) if incomplete."""
    value = 0
    for i in range(4):
        if pos + 1 + i >= size:
            return 0, -1
        byte = buf[pos + 1 + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0:
                raise MalformedPacket("remaining length not in its shortest form")
            return value, pos + 2 + i
    raise MalformedPacket("remaining length longer than 4 bytes")
