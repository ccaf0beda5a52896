"""What the simulated upstreams share: listening, stopping, `async with`, and the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Protocol, Self

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


class LoopbackHttpServer:
    """A standard-library HTTP server on a free loopback port, in a daemon thread: for services the
    tests run beside the gateway (an OTLP collector, a guard service); `with` starts and stops it."""

    server: ThreadingHTTPServer
    thread: threading.Thread

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        # A stop request is looked for between selects: every 50 ms, not serve_forever's 0.5 s,
        # which each test starting one of these paid on leaving its `with`.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Upstream(Protocol):
    url: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def command_line(
    what: str,
    make: Callable[[argparse.Namespace], Upstream],
    argv: Sequence[str] | None,
    options: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
    seed: str = "seed of the usage numbers",
) -> None:
    """`python -m ai_gateway_tools.simulators.X`: the simulated upstream on a port until Ctrl-C,
    its URL printed first (tests and users read it from there)."""
    parser = argparse.ArgumentParser(description=f"Run the simulated {what} upstream until Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--seed", type=int, default=0, help=seed)
    options(parser)
    args = parser.parse_args(argv)

    async def serve_forever() -> None:
        upstream = make(args)
        await upstream.start()
        try:
            print(f"Simulated {what} upstream listening on {upstream.url}", flush=True)
            await asyncio.Future()
        finally:
            await upstream.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever())
