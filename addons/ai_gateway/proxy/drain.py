"""Graceful shutdown, as Envoy and nginx drain: stop accepting, let open work finish, then close.

mitmproxy stops on SIGTERM/SIGINT by running the `done` hooks at once: open connections are cut
when the event loop ends, and a response relayed after the gateway closed its ledger would be
missing from it. Instead, on the first signal the listening servers are stopped (new
connections are refused, so a load balancer sends them elsewhere), idle keep-alive connections
are closed, HTTP/1 responses ask the client to close (`connection: close`), and open requests
and WebSocket sessions run on until they end or `gateway_drain_seconds` passes; what is still
open then is closed. Only then is mitmproxy shut down, so `done` closes the ledger last. A
second signal stops at once (the open connections are closed first all the same).

mitmproxy's `proxyserver` addon holds the listening servers and a handler per client
connection; closing one is what mitmproxy's own inactivity timeout does (cancel the task reading
from the client). Nothing of mitmproxy is patched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.connection import Client
from mitmproxy.proxy import events

DRAIN_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
POLL_SECONDS = 0.05
CLOSE_SECONDS = 5.0  # for closed connections to run their hooks, after the deadline

logger = logging.getLogger(__name__)
_released: set[asyncio.Task[None]] = set()  # tasks are only weakly referenced by the event loop


class Drain:
    """Knows which client connections are busy (a request or a WebSocket session open) and drains them."""

    def __init__(self) -> None:
        self.busy: dict[str, set[str]] = {}  # client connection id -> ids of its open flows
        self.task: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_drain_seconds",
            int,
            DRAIN_SECONDS,
            "On SIGTERM/SIGINT: stop accepting connections and let open requests and sessions finish for up "
            "to this many seconds before closing them (Kubernetes' default grace period is 30 s).",
        )

    @property
    def draining(self) -> bool:
        return self.task is not None

    def running(self) -> None:
        """Take over SIGTERM and SIGINT from the launcher (mitmdump, mitmweb, scripts/serve)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self.stop_signal)

    def stop_signal(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.drain(ctx.options.gateway_drain_seconds))
        else:
            logger.info("ai-gateway: second stop signal: closing every connection now")
            self.task.cancel()
            asyncio.get_running_loop().create_task(self.close_all())

    async def drain(self, seconds: float) -> None:
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        deadline = time.monotonic() + seconds
        for server in list(proxyserver.servers):
            if server.is_running:
                await server.stop()
        logger.info(
            "ai-gateway: draining: no new connections; %d open ones may finish for up to %g s",
            len(proxyserver.connections),
            seconds,
        )
        while proxyserver.connections and time.monotonic() < deadline:
            for client_id in list(proxyserver.connections):
                if not self.busy.get(client_id):
                    close(proxyserver.connections[client_id], "idle during drain")
            await asyncio.sleep(POLL_SECONDS)
        await self.close_all()

    async def close_all(self) -> None:
        await close_connections()
        ctx.master.shutdown()

    async def done(self) -> None:
        """First of the gateway's addons to finish: connections still open (a shutdown that did not
        drain) are closed before the others close the store, the traces and the ledger. A script
        reload is not a shutdown: it must not cut anyone off."""
        if ctx.master.should_exit.is_set():
            await close_connections()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.busy.setdefault(flow.client_conn.id, set()).add(flow.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if not self.draining or response is None or response.status_code == 101:
            return
        if response.http_version.startswith("HTTP/1"):  # HTTP/2 has no such header
            response.headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or flow.response.status_code != 101:  # a WebSocket stays open
            self.finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.finished(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.finished(flow)

    def client_disconnected(self, client: Client) -> None:
        self.busy.pop(client.id, None)
        release(client)

    def finished(self, flow: http.HTTPFlow) -> None:
        if (flows := self.busy.get(flow.client_conn.id)) is not None:
            flows.discard(flow.id)


async def close_connections() -> None:
    """Close every client connection and wait (bounded) until their hooks ran: after this, nothing
    more is relayed, so nothing a client sees can miss the ledger closed next."""
    proxyserver: Any = ctx.master.addons.get("proxyserver")
    if proxyserver is None or not proxyserver.connections:
        return
    logger.warning("ai-gateway: closing %d connections still open", len(proxyserver.connections))
    for handler in list(proxyserver.connections.values()):
        close(handler, "gateway shutdown")
    deadline = time.monotonic() + CLOSE_SECONDS
    while proxyserver.connections and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)


def release(client: Client) -> None:
    """Finish what mitmproxy skipped for a client connection it is done with: closing its socket
    and telling the layers it closed.

    mitmproxy 12.3's `ConnectionHandler.handle_connection` catches a cancel only around its reads:
    a connection closed by a command (the TCP layer's close after the upstream's, a close frame
    relayed by the WebSocket layer) while its reader task waits for the handler's event lock ends
    that task without its tail, `server_event(ConnectionClosed)` and `writer.close()`. The client
    then waits for a TCP close that never comes (its close_timeout, 10 s for websockets), and the
    layers never end the flow (no `tcp_end` or `websocket_end`: a session left open). By
    `client_disconnected` the task has ended, so a writer still open is one whose tail was skipped."""
    proxyserver: Any = ctx.master.addons.get("proxyserver")
    handler = None if proxyserver is None else proxyserver.connections.get(client.id)
    io = None if handler is None else handler.transports.get(client)
    writer = None if io is None else io.writer
    try:
        if writer is not None and not writer.is_closing():
            logger.debug("ai-gateway: closing the connection mitmproxy left open for %s", client.peername)
            writer.close()
            task = asyncio.get_running_loop().create_task(handler.server_event(events.ConnectionClosed(client)))
            _released.add(task)
            task.add_done_callback(_released.discard)
    except Exception:
        logger.exception("ai-gateway: closing a client connection failed")


def close(handler: Any, reason: str) -> None:
    """Close a client connection as mitmproxy's inactivity timeout does: cancel the task reading it."""
    io = handler.transports.get(handler.client)
    if io is not None and io.handler is not None:
        io.handler.cancel(reason)
