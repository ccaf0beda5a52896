"""What the in-process addon tests share: the gateway inside mitmproxy's test context."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from hypothesis import settings
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.observer import Observer, ResponseRecord
from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway.proxy.addon import Gateway

# scripts/test --fast (`--hypothesis-profile=fast`): each property test runs a quarter of its examples,
# for the edit loop; the whole suite (scripts/test, CI) runs every one.
settings.register_profile("fast", max_examples=25)


def examples(full: int) -> int:
    """A property test's example count: `full` in the whole suite, scaled by the loaded profile's
    share of hypothesis' default 100 (a quarter under `fast`)."""
    return max(10, full * settings.default.max_examples // 100)


@contextlib.contextmanager
def configured_gateway(**options: Any) -> Iterator[Gateway]:
    """The gateway's addons in mitmproxy's test context with the default policy (unless one is
    given), no metrics endpoint, and these options; its hooks are called directly by the test."""
    gateway = Gateway()
    with taddons.context(gateway) as context:
        context.configure(gateway, **{"gateway_metrics_port": 0, "gateway_policy": str(DEFAULT_POLICY), **options})
        yield gateway


class Records(Observer):
    """An observer that keeps the finished responses the meters report (the access log's and traces' view)."""

    active = True

    def __init__(self) -> None:
        self.responses: list[ResponseRecord] = []

    def response_finished(self, record: ResponseRecord) -> None:
        self.responses.append(record)


def sample_total(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(
        sample.value
        for metric in metrics.registry.collect()
        for sample in metric.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def relay(
    gateway: Gateway, events: list[tuple[bool, dict[str, Any]]], relayed: list[bytes] | None = None
) -> http.HTTPFlow:
    """A Realtime session's events through the gateway's session meter, as mitmproxy's WebSocket
    layer hands them over; `relayed` gets what mitmproxy sends on of each, after the hook."""
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime?model=gpt-realtime"
    flow.websocket.messages.clear()
    gateway.session_metering.websocket_start(flow)
    for from_client, event in events:
        flow.websocket.messages.append(WebSocketMessage(1, from_client, json.dumps(event).encode()))
        gateway.session_metering.websocket_message(flow)
        if relayed is not None:
            relayed.append(flow.websocket.messages[-1].content)
    gateway.session_metering.websocket_end(flow)
    return flow
