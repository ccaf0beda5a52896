"""The addon inside mitmproxy's own test context, with real mitmproxy flow objects."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.addon import Gateway, parse_history
from ai_gateway.headers import REDACTED
from ai_gateway.policy import DEFAULT_POLICY


def realtime_flow():
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime?model=gpt-realtime"
    flow.websocket.messages.clear()
    return flow


def relay(gateway: Gateway, flow, content: bytes, from_client: bool = False) -> None:
    flow.websocket.messages.append(WebSocketMessage(1, from_client, content))
    gateway.websocket_message(flow)


@pytest.fixture
def gateway():
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY), gateway_websocket_history="auto"
        )
        yield addon


def test_history_is_bounded_to_the_last_message(gateway):
    flow = realtime_flow()
    gateway.websocket_start(flow)
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
    gateway.websocket_message(flow)
    assert "websocket_message failed" in caplog.text


def test_session_state_is_released_when_the_flow_ends(gateway):
    flow = realtime_flow()
    gateway.websocket_start(flow)
    assert flow.id in gateway.sessions
    gateway.websocket_end(flow)
    assert flow.id not in gateway.sessions


def test_client_credentials_are_replaced_and_redacted(tmp_path, monkeypatch):
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
        addon.requestheaders(flow)
        assert "authorization" not in flow.request.headers
        assert flow.request.headers["sec-websocket-protocol"] == "realtime"
        addon.credential.request(flow)
        assert flow.request.headers["authorization"] == "Bearer sk-upstream"
        addon.responseheaders(flow)
        assert flow.request.headers["authorization"] == f"Bearer {REDACTED}"


def test_invalid_policy_change_while_running_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  /x: Nope\n")
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY))
        addon.is_running = True
        with pytest.raises(exceptions.OptionsError, match=r"bad\.yaml:2: routes\./x: expected one of"):
            tctx.configure(addon, gateway_policy=str(bad))
        assert addon.policy is not None and addon.policy.source == str(DEFAULT_POLICY)
        assert tctx.options.gateway_policy == str(DEFAULT_POLICY)
