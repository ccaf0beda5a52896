"""proxy/drain.py's release: a client connection mitmproxy is done with but left open gets closed,
and its layers are told."""

from __future__ import annotations

import asyncio

from mitmproxy.proxy import events
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.test import taddons, tflow

from ai_gateway.proxy.drain import Drain


class Writer:
    def __init__(self, closing: bool) -> None:
        self.closed = closing

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Handler:
    """A connection handler as far as release uses it: its transports and its event entry."""

    def __init__(self, client, writer: Writer) -> None:
        self.transports = {client: ConnectionIO(handler=None, reader=None, writer=writer)}  # type: ignore[arg-type]
        self.events: list[events.Event] = []

    async def server_event(self, event: events.Event) -> None:
        self.events.append(event)


class Proxyserver:
    """mitmproxy's proxyserver as far as release reads it: client connection id -> handler."""

    def __init__(self) -> None:
        self.connections: dict[str, Handler] = {}


def test_a_client_connection_left_open_is_closed_and_its_layers_told():
    drain, proxyserver = Drain(), Proxyserver()
    left_open, closing, gone = tflow.tclient_conn(), tflow.tclient_conn(), tflow.tclient_conn()
    handlers = {client.id: Handler(client, Writer(closing=client is closing)) for client in (left_open, closing)}
    proxyserver.connections.update(handlers)

    async def disconnect() -> None:
        for client in (left_open, closing, gone):  # gone: mitmproxy already dropped its handler
            drain.client_disconnected(client)
        await asyncio.sleep(0)  # the event is handed over in a task, as mitmproxy hands over its own

    with taddons.context(drain, proxyserver):
        asyncio.run(disconnect())
    (told,) = handlers[left_open.id].events
    assert isinstance(told, events.ConnectionClosed) and told.connection is left_open
    assert handlers[left_open.id].transports[left_open].writer.closed  # type: ignore[union-attr]
    assert not handlers[closing.id].events  # mitmproxy ran its own tail
