"""Split a child process's byte stream into text lines, keeping unread data across cancellations."""

from __future__ import annotations

import anyio
from anyio.abc import ByteReceiveStream

__all__ = ["LineReader"]

#: Longer lines are cut into pieces of this many bytes, so a child without newlines cannot exhaust memory.
MAX_LINE_BYTES = 64 * 1024


class LineReader:
    """Reads lines (without their ending) from a byte stream; cancelling ``readline`` loses no data."""

    def __init__(self, stream: ByteReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def readline(self) -> str | None:
        """The next line, decoded as UTF-8 (invalid bytes replaced), or ``None`` at the end of the stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                return self._take(end, end + 1)
            if len(self._buffer) >= MAX_LINE_BYTES:
                return self._take(MAX_LINE_BYTES, MAX_LINE_BYTES)
            if self._eof:
                if self._buffer:
                    return self._take(len(self._buffer), len(self._buffer))
                return None
            try:
                chunk = await self._stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._eof = True
            else:
                self._buffer += chunk

    def _take(self, line_end: int, consumed: int) -> str:
        line = bytes(self._buffer[:line_end])
        del self._buffer[:consumed]
        return line.decode("utf-8", errors="replace").rstrip("\r")
