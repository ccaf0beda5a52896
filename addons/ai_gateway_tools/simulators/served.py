"""What the simulated WebSocket upstreams share: listening, stopping, and `async with`."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from websockets.asyncio.server import Server


class Served:
    """A websockets server's lifecycle; subclasses start it with `listening(await serve(...))`."""

    port: int
    _server: Server | None = None

    async def start(self) -> None:
        raise NotImplementedError

    def listening(self, server: Server) -> None:
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
