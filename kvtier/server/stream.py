"""A server connection's byte stream: plain TCP through the event loop's socket calls, or TLS.

The plain stream receives straight into the caller's buffer and sends the caller's views (no copy).
The TLS stream runs an `ssl.SSLObject` over memory BIOs on the same non-blocking socket: ciphertext
moves through the loop's socket calls, plaintext is decrypted into the caller's buffer. Both end
with `recv_into` returning 0 when the client closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

_TLS_READ = 256 * 1024  # most ciphertext bytes taken from the socket at once
_TLS_RECORD = 17 * 1024  # a TLS record's ciphertext at most (16 KiB of data + overhead)
_TLS_WRITE = 256 * 1024  # plaintext bytes encrypted and sent at once (bounds the outgoing BIO)


class Stream:
    """Plain TCP."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def start(self) -> None:
        """Whatever must happen before the first frame (the TLS handshake)."""

    async def recv_into(self, view: memoryview) -> int:
        """Receive into `view`; how many bytes (0: the client closed the connection)."""
        return await asyncio.get_running_loop().sock_recv_into(self.sock, view)

    async def sendall(self, view: memoryview | bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, view)

    def send_now(self, data: bytes) -> None:
        """Best effort, without waiting: a last word before closing."""
        with contextlib.suppress(OSError):  # the client is gone or not reading: the closed connection tells it
            self.sock.send(data)

    def close(self) -> None:
        self.sock.close()


class TLSStream(Stream):
    """TLS (server side) over memory BIOs."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def start(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill(_TLS_RECORD):
                    raise ConnectionError("the client closed the connection during the TLS handshake") from None
        await self._flush()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n: int = self._tls.read(len(view), view)  # type: ignore[assignment]  # an int with a buffer
                return n
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. a key update to answer
                if not await self._fill(min(_TLS_READ, len(view) + _TLS_RECORD)):  # no more than asked for
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    async def sendall(self, view: memoryview | bytes) -> None:
        data = memoryview(view).cast("B")
        for start in range(0, len(data), _TLS_WRITE):
            self._tls.write(data[start : start + _TLS_WRITE])
            await self._flush()

    def send_now(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # ssl.SSLError too
            self._tls.write(data)
            self.sock.send(self._outgoing.read())

    async def _fill(self, size: int) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self.sock, size)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
