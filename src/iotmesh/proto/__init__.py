"""Sans-IO codecs: bytes in, typed values or events out. No sockets, no asyncio."""
