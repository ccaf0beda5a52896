"""Injected WebSocket messages kept whole (proxy/injection.py): mitmproxy glues an injected payload to
the half-received message from the same side; the gateway cuts it back and hands the half on."""

from __future__ import annotations

import pytest
from mitmproxy import ctx
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.proxy.injection import Injections, Links

from .conftest import configured_gateway

ERROR = b'{"type":"error","error":{"code":"budget_exceeded"}}'


@pytest.fixture
def sent(monkeypatch):
    """What was handed to mitmproxy's `inject.websocket`, instead of a live connection."""
    calls: list[tuple] = []
    with configured_gateway():
        monkeypatch.setattr(ctx.master.commands, "call", lambda *args: calls.append(args))
        yield calls


def message(content: bytes, *, from_client: bool = False, injected: bool = False) -> WebSocketMessage:
    return WebSocketMessage(1, from_client, content, injected=injected)


def test_an_injection_is_sent_through_mitmproxy_and_recognised_when_it_arrives(sent):
    injections, flow = Injections(), tflow.twebsocketflow()
    assert not injections.active
    injections.send(flow, True, ERROR)
    assert sent == [("inject.websocket", flow, True, ERROR)]
    assert injections.active
    arriving = message(ERROR, injected=True)
    assert injections.arrived(flow, arriving)
    assert arriving.content == ERROR and not injections.active


def test_an_injection_glued_to_half_a_message_is_cut_back_and_the_half_goes_to_the_next(sent):
    injections, flow = Injections(), tflow.twebsocketflow()
    delta = b'{"type":"response.output_audio.delta","delta":"AAAA"}'
    injections.send(flow, True, ERROR)
    glued = message(delta[:20] + ERROR, injected=True)  # mitmproxy appended it to the first half
    assert injections.arrived(flow, glued)
    assert glued.content == ERROR
    assert injections.active  # the cut half waits for the rest of its message
    rest = message(delta[20:])
    assert not injections.arrived(flow, rest)  # a peer's message: metered as usual
    assert rest.content == delta and not injections.active


def test_sides_and_flows_are_kept_apart(sent):
    injections, flow, other = Injections(), tflow.twebsocketflow(), tflow.twebsocketflow()
    cancel = b'{"type":"response.cancel"}'
    injections.send(flow, False, cancel)  # towards the upstream
    assert not injections.arrived(flow, message(cancel, injected=True))  # towards the client: not this one
    assert not injections.arrived(other, message(cancel, from_client=True, injected=True))
    assert injections.arrived(flow, message(cancel, from_client=True, injected=True))


def test_an_unknown_injected_message_is_not_taken_for_the_gateways(sent):
    injections, flow = Injections(), tflow.twebsocketflow()
    injections.send(flow, True, ERROR)
    someone_elses = message(b'{"type":"other"}', injected=True)  # another addon's injection
    assert not injections.arrived(flow, someone_elses)
    assert someone_elses.content == b'{"type":"other"}' and injections.active


def test_a_finished_flow_is_forgotten(sent):
    injections, flow = Injections(), tflow.twebsocketflow()
    injections.send(flow, True, ERROR)
    injections.arrived(flow, message(b"half" + ERROR, injected=True))
    injections.send(flow, False, b"{}")
    injections.forget(flow.id)
    assert not injections.active and not injections.pending and not injections.cut


class Link:
    """A session relayed as bytes, as SessionMetering and the guards reach it (ByteSession's part)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bool, bytes]] = []
        self.closed: list[tuple[int, str]] = []

    @property
    def open(self) -> bool:
        return not self.closed

    def send(self, to_client: bool, payload: bytes) -> None:
        self.sent.append((to_client, payload))

    def close(self, code: int, reason: str) -> bool:
        self.closed.append((code, reason))
        return True


def test_links_reach_a_byte_session_through_its_link_and_forget_it_at_the_end(sent):
    links, flow, link = Links(), tflow.twebsocketflow(), Link()
    links.add(flow.id, link)
    links.send(flow, True, ERROR)
    assert links.open(flow)
    assert links.close(flow, 1008, "blocked")
    assert link.sent == [(True, ERROR)] and link.closed == [(1008, "blocked")]
    assert not links.open(flow)
    assert sent == []  # nothing through mitmproxy's WebSocket layer
    links.forget(flow.id)
    links.send(flow, False, ERROR)  # the flow is now one on the WebSocket layer
    assert sent == [("inject.websocket", flow, False, ERROR)] and link.sent == [(True, ERROR)]
