"""The credential layer takes the place of mitmproxy's HTTP layer in the stack NextLayer chose."""

from __future__ import annotations

import dataclasses

from mitmproxy.options import Options
from mitmproxy.proxy import context, layer
from mitmproxy.proxy.layers import ClientTLSLayer, ServerTLSLayer
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, HttpStream, RequestHeaders
from mitmproxy.proxy.tunnel import LayerStack
from mitmproxy.test import tflow

from ai_gateway.config.policy import Auth
from ai_gateway.proxy.credential import CredentialHttpLayer, UpstreamCredential


def decided(*make) -> tuple[layer.NextLayer, context.Context]:
    flow = tflow.tflow()
    ctx = context.Context(flow.client_conn, Options())
    nextlayer = layer.NextLayer(ctx)
    stack = LayerStack()
    for kind in make:
        stack /= kind(ctx)
    nextlayer.layer = stack[0]
    return nextlayer, ctx


def http(ctx: context.Context) -> HttpLayer:
    return HttpLayer(ctx, HTTPMode.transparent)


def test_a_lone_http_layer_is_replaced():
    nextlayer, ctx = decided(http)
    UpstreamCredential().next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CredentialHttpLayer) and ctx.layers == [nextlayer.layer]


def test_an_http_layer_under_tls_layers_is_replaced_in_place():
    nextlayer, ctx = decided(ServerTLSLayer, ClientTLSLayer, http)
    UpstreamCredential().next_layer(nextlayer)
    server_tls, client_tls, ours = ctx.layers
    assert nextlayer.layer is server_tls and server_tls.child_layer is client_tls and client_tls.child_layer is ours
    assert type(ours) is CredentialHttpLayer and ours.mode is HTTPMode.transparent


def test_another_addons_http_layer_is_left_alone(caplog):
    class Custom(HttpLayer):
        pass

    nextlayer, ctx = decided(lambda c: Custom(c, HTTPMode.regular))
    credential = UpstreamCredential()
    credential.next_layer(nextlayer)
    credential.next_layer(nextlayer)
    assert type(nextlayer.layer) is Custom
    assert caplog.text.count("no upstream key is added") == 1


def test_only_request_heads_sent_upstream_get_the_key():
    seen = []

    class Connection(layer.Layer):
        def _handle_event(self, event):
            seen.append(event)
            yield from ()

    nextlayer, ctx = decided(http)
    credential = UpstreamCredential()
    credential.next_layer(nextlayer)
    ours = nextlayer.layer
    flow_request = tflow.tflow().request
    heads = RequestHeaders(1, flow_request, end_stream=True)
    list(ours.event_to_child(Connection(ctx), heads))
    credential.auth = Auth(env="K", key="sk-up")
    list(ours.event_to_child(Connection(ctx), heads))
    stream = HttpStream(ctx, 1)
    stream.handle_event = lambda event: seen.append(event) or iter(())
    list(ours.event_to_child(stream, heads))
    without, keyed, to_stream = seen
    assert without.request is flow_request and to_stream.request is flow_request
    assert keyed.request.headers["authorization"] == "Bearer sk-up"
    assert dataclasses.replace(keyed, request=flow_request) == heads
    assert "authorization" not in flow_request.headers and keyed.request.raw_content is flow_request.raw_content
