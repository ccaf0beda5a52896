"""The byte floor (issue #22): a plain uvloop relay that forwards bytes both ways and parses
nothing, the least CPU per relayed message a Python relay can spend; the frames path is measured
against it.

    python -m ai_gateway_tools.bench.floor PORT UPSTREAM_HOST:UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Pipe(asyncio.Protocol):
    """One leg: what arrives is written to the other leg's transport (no flow control: the bench's
    peers read as fast as they are sent to)."""

    def __init__(self, peer: Pipe | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def relay(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()

    class Client(Pipe):
        """The client's leg: what it sends before the upstream leg is connected waits in a list."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.early: list[bytes] | None = []
            self.dialing = loop.create_task(self.dial())  # referenced: the loop keeps tasks weakly

        def data_received(self, data: bytes) -> None:
            if self.early is not None:
                self.early.append(data)
            else:
                super().data_received(data)

        async def dial(self) -> None:
            try:
                _, upstream = await loop.create_connection(lambda: Pipe(self), host, upstream_port)
            except OSError:
                assert self.transport is not None
                self.transport.close()
                return
            self.peer = upstream
            early, self.early = self.early or [], None
            upstream.transport.write(b"".join(early))  # type: ignore[union-attr]

    server = await loop.create_server(Client, "127.0.0.1", port)
    print(f"floor relay listening at 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    host, upstream_port = sys.argv[2].rsplit(":", 1)
    uvloop.run(relay(int(sys.argv[1]), host, int(upstream_port)))
