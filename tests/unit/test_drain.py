"""proxy/drain.py's release: a client socket mitmproxy is done with but left open gets closed."""

from __future__ import annotations

from types import SimpleNamespace

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


class Proxyserver:
    """mitmproxy's proxyserver as far as release reads it: client connection id -> handler."""

    def __init__(self) -> None:
        self.connections: dict[str, SimpleNamespace] = {}


def test_a_client_writer_left_open_is_closed_once_the_client_disconnected():
    drain, proxyserver = Drain(), Proxyserver()
    with taddons.context(drain, proxyserver):
        left_open, closing, gone = tflow.tclient_conn(), tflow.tclient_conn(), tflow.tclient_conn()
        writers = {left_open.id: Writer(closing=False), closing.id: Writer(closing=True)}
        for client in (left_open, closing):
            io = ConnectionIO(handler=None, reader=None, writer=writers[client.id])  # type: ignore[arg-type]
            proxyserver.connections[client.id] = SimpleNamespace(transports={client: io})
        for client in (left_open, closing, gone):  # gone: mitmproxy already dropped its handler
            drain.client_disconnected(client)
    assert writers[left_open.id].closed and writers[closing.id].closed
