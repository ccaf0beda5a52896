"""The addon inside mitmproxy's own test context, with real mitmproxy flow objects."""

from __future__ import annotations

import json
import re

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway.proxy.addon import Gateway
from ai_gateway.proxy.history import parse_history

from .conftest import configured_gateway


def realtime_flow():
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime?model=gpt-realtime"
    flow.websocket.messages.clear()
    return flow


def relay(gateway: Gateway, flow, content: bytes, from_client: bool = False) -> None:
    flow.websocket.messages.append(WebSocketMessage(1, from_client, content))
    gateway.session_metering.websocket_message(flow)


@pytest.fixture
def gateway():
    with configured_gateway(gateway_websocket_history="auto") as addon:
        yield addon


def test_history_is_bounded_to_the_last_message(gateway):
    flow = realtime_flow()
    gateway.session_metering.websocket_start(flow)
    for i in range(100):
        relay(gateway, flow, json.dumps({"type": "response.output_audio.delta", "delta": "A" * 1000, "i": i}).encode())
    assert len(flow.websocket.messages) == 1
    assert b'"i": 99' in flow.websocket.messages[-1].content


def test_history_option(gateway):
    assert parse_history("auto", under_web=False) == 1
    assert parse_history("auto", under_web=True) is None
    assert parse_history("all", under_web=False) is None
    assert parse_history("50", under_web=False) == 50
    with pytest.raises(ValueError, match="gateway_websocket_history"):
        parse_history("-3", under_web=False)


def test_a_failing_hook_never_raises(gateway, caplog):
    flow = realtime_flow()
    flow.websocket = None  # a state the hook does not expect
    gateway.session_metering.websocket_message(flow)
    assert "websocket_message failed" in caplog.text


def test_session_state_is_released_when_the_flow_ends(gateway):
    flow = realtime_flow()
    gateway.session_metering.websocket_start(flow)
    assert flow.id in gateway.session_metering.sessions
    gateway.session_metering.websocket_end(flow)
    assert flow.id not in gateway.session_metering.sessions


def test_client_credentials_are_removed_and_the_flow_never_gets_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ADDON_TEST_KEY", "sk-upstream")
    policy = tmp_path / "p.yaml"
    policy.write_text("auth:\n  env: ADDON_TEST_KEY\nroutes:\n  '*': Passthrough\n")
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_metrics_port=0, gateway_policy=str(policy))
        flow = tflow.tflow()
        flow.response = None
        flow.request.headers["authorization"] = "Bearer sk-client"
        flow.request.headers["sec-websocket-protocol"] = "realtime, openai-insecure-api-key.sk-browser"
        addon.request_policy.requestheaders(flow)
        assert "authorization" not in flow.request.headers
        assert flow.request.headers["sec-websocket-protocol"] == "realtime"
        addon.http_metering.request(flow)
        addon.http_metering.responseheaders(flow)
        assert "authorization" not in flow.request.headers  # the key goes only into the bytes sent upstream


def test_invalid_policy_change_while_running_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  /x: Nope\n")
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY))
        addon.state.is_running = True
        with pytest.raises(exceptions.OptionsError, match=r"bad\.yaml:2: routes\./x: expected one of"):
            tctx.configure(addon, gateway_policy=str(bad))
        assert addon.state.policy is not None and addon.state.policy.source == str(DEFAULT_POLICY)
        assert tctx.options.gateway_policy == str(DEFAULT_POLICY)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("gateway_access_log", "yaml", "gateway_access_log: expected one of text, json, off, got 'yaml'"),
        ("gateway_otlp_endpoint", "collector:4318", "gateway_otlp_endpoint: expected an http(s) URL"),
    ],
)
def test_invalid_observability_options_are_refused_while_running(option, value, message):
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY), gateway_access_log="json")
        addon.state.is_running = True
        with pytest.raises(exceptions.OptionsError, match=re.escape(message)):
            tctx.configure(addon, **{option: value})
        assert addon.state.observability.access_log is not None  # the previous value stays
        assert addon.state.observability.tracing is None


def audio_delta(i: int) -> bytes:
    return json.dumps(
        {"type": "response.output_audio.delta", "response_id": "resp_1", "delta": "QUJD" * 1600, "i": i}
    ).encode()


def test_relayed_audio_is_replaced_by_a_placeholder_in_kept_history(tmp_path):
    # the whole history, no audio kept by the caps: every relayed frame shrunk
    with configured_gateway(gateway_websocket_history="all", gateway_audio_session_mb=0) as addon:
        flow = realtime_flow()
        addon.session_metering.websocket_start(flow)
        for i in range(3):
            relay(addon, flow, audio_delta(i))
            # the newest message is relayed after the hook: it must still carry its audio
            assert flow.websocket.messages[-1].content == audio_delta(i)
        assert len(flow.websocket.messages) == 3
        for message in flow.websocket.messages[:-1]:
            event = json.loads(message.content)
            assert event["delta"] == "<audio pcm16 24 kHz: 4,800 bytes, 100 ms>"
        addon.session_metering.websocket_end(flow)
        assert b"QUJD" not in flow.websocket.messages[-1].content


def test_session_totals_become_the_flow_comment_and_errors_mark_it(gateway):
    flow = realtime_flow()
    gateway.session_metering.websocket_start(flow)
    relay(
        gateway, flow, json.dumps({"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}).encode()
    )
    usage = {"input_tokens": 1200, "output_tokens": 30, "input_token_details": {"cached_tokens": 1000}}
    for _ in range(2):
        relay(
            gateway,
            flow,
            json.dumps({"type": "response.done", "response": {"status": "completed", "usage": usage}}).encode(),
        )
    cost = gateway.state.metrics.registry.get_sample_value(
        "agentgateway_gen_ai_client_cost_usd_total",
        {
            "gen_ai_operation_name": "realtime",
            "gen_ai_system": "openai",
            "gen_ai_request_model": "gpt-realtime",
            "gen_ai_response_model": "gpt-realtime-2025-08-28",
        },
    )
    assert cost > 0
    assert flow.comment == (
        f"2 responses · input 2,400 (cached 2,000) · output 60 tokens · gpt-realtime-2025-08-28 · ${cost:,.4f}"
    )
    assert not flow.marked
    relay(gateway, flow, b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}')
    assert flow.comment.endswith("· 1 error")
    assert flow.marked == ":exclamation:"


def test_the_client_key_is_relayed_as_sent_and_masked_once_the_upstream_answered(gateway):
    """Passed through (no auth in the policy): the request mitmproxy writes upstream is the flow's,
    so it keeps the key through the request hooks; from the response on, the flow shows its last four."""
    client_key = "sk-client-own-key-0123456789"
    flow = tflow.tflow()
    flow.request.path = "/v1/chat/completions"
    flow.request.headers["authorization"] = f"Bearer {client_key}"
    gateway.request_policy.requestheaders(flow)
    gateway.http_metering.request(flow)
    assert flow.request.headers["authorization"] == f"Bearer {client_key}"
    flow.response = tflow.tresp()
    gateway.request_policy.responseheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer …6789"


def test_every_method_named_after_a_hook_takes_that_hook_s_arguments():
    """mitmproxy calls any addon method whose name is a hook's with that hook's arguments: a helper
    named `request(flow, route)` on an addon in the chain fails on every request."""
    import dataclasses
    import inspect

    from mitmproxy import hooks
    from mitmproxy.addonmanager import traverse

    gateway = Gateway()
    wrong = []
    for addon in traverse([gateway]):
        for name, hook in hooks.all_hooks.items():
            method = getattr(addon, name, None)
            if not callable(method):
                continue
            arguments = [object()] * len(dataclasses.fields(hook))
            try:
                inspect.signature(method).bind(*arguments)
            except TypeError:
                wrong.append(f"{type(addon).__name__}.{name}")
    assert wrong == []


def test_a_session_on_a_guarded_route_is_relayed_as_bytes(tmp_path):
    """Guardrails run on the byte paths as on messages: a route with guards takes them like any other."""
    policy = tmp_path / "guarded.yaml"
    policy.write_text(
        "routes:\n  /realtime:\n    type: Realtime\n    guardrails: [{name: names, kind: regex, deny: ['falcon']}]\n"
    )
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_metrics_port=0, gateway_policy=str(policy), gateway_relay="frames")
        assert addon.frame_relay.eligible(realtime_flow())
        tctx.configure(addon, gateway_relay="messages")
        assert not addon.frame_relay.eligible(realtime_flow())


def test_auto_keeps_messages_when_a_scripts_addon_has_a_websocket_hook():
    """gateway_relay=auto: a user's addon loaded with -s is a child of mitmproxy's Script addon; one
    with any WebSocket hook (here an exporter on websocket_end) keeps sessions on messages."""

    class Exporter:
        def websocket_end(self, flow: http.HTTPFlow) -> None:
            pass

    class Script:  # as mitmproxy's Script addon holds a script's addons
        def __init__(self) -> None:
            self.addons = [Exporter()]

    with configured_gateway(gateway_relay="auto") as gateway:
        assert gateway.frame_relay.frames()
        ctx.master.addons.add(Script())
        assert not gateway.frame_relay.frames()
