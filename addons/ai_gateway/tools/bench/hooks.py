"""The per-frame hook cost: Gateway.websocket_message on Realtime frames, in process (mitmproxy's
test context), against an empty hook called the same way, so that only the gateway's own work counts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway.proxy.addon import Gateway
from ai_gateway.tools.bench.measure import traffic
from ai_gateway.tools.loadgen import audio_base64
from ai_gateway.tools.simulators.realtime import EXAMPLE_USAGE, GA

# The targets of issue #5; shown in BENCHMARKS.md, never asserted by timed tests.
HOOK_DELTA_US = 3.0
HOOK_DONE_US = 30.0


@dataclass(frozen=True)
class HookCost:
    frame: str
    gateway_us: float
    empty_us: float
    target_us: float | None


class EmptyHook:
    """The floor: a websocket_message hook that does nothing, called the same way."""

    def websocket_message(self, flow: Any) -> None:
        pass


def realtime_frames(args: argparse.Namespace, responses: int) -> dict[str, list[WebSocketMessage]]:
    """The frames a voice session is made of, as the simulator and a client send them: audio deltas
    with their type first (OpenAI), after event_id (DashScope) and last (sorted keys), and
    `responses` response.done frames, each of its own response (a response id is billed once)."""
    rng = random.Random(args.seed)
    where = {"response_id": "resp_1", "item_id": "item_2", "output_index": 0, "content_index": 0}
    response = {"object": "realtime.response", "status": "completed", "metadata": None, "usage": EXAMPLE_USAGE}
    delta = {"type": GA.audio_delta, "event_id": "event_7", **where, "delta": audio_base64(rng, args.delta_ms)}
    append = json.loads(traffic(args).append(rng))

    def server(event: dict[str, Any], **dumps: Any) -> WebSocketMessage:
        return WebSocketMessage(1, False, json.dumps(event, **dumps).encode())

    return {
        "server audio delta": [server(delta)],
        "server audio delta, event_id first": [server({"event_id": "event_7", **delta})],
        "server audio delta, type last": [server(delta, sort_keys=True)],
        "client audio append": [WebSocketMessage(1, True, json.dumps(append).encode())],
        "response.done": [
            server({"type": "response.done", "event_id": f"event_{i}", "response": {**response, "id": f"resp_{i}"}})
            for i in range(responses)
        ],
    }


def time_hook(hook: Callable[[Any], None], flow: Any, frames: list[WebSocketMessage], iterations: int) -> float:
    """Microseconds per call, the median of 5 repeats; each call sees the next frame appended as mitmproxy does."""
    messages = flow.websocket.messages
    per_call = []
    sent = 0
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(iterations):
            messages.append(frames[sent % len(frames)])
            sent += 1
            hook(flow)
        per_call.append((time.perf_counter_ns() - started) / iterations / 1000)
        del messages[:]
    return statistics.median(per_call)


def hook_costs(args: argparse.Namespace) -> list[HookCost]:
    """Gateway.websocket_message on a Realtime session in mitmproxy's test context, against an empty hook."""
    gateway, empty = Gateway(), EmptyHook()
    targets = {"response.done": HOOK_DONE_US} | {
        name: HOOK_DELTA_US
        for name in ("server audio delta", "server audio delta, event_id first", "server audio delta, type last")
    }
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY))
        flow = tflow.twebsocketflow()
        assert flow.websocket is not None
        flow.request.path = "/v1/realtime?model=gpt-realtime"
        del flow.websocket.messages[:]
        gateway.websocket_start(flow)
        session = {"type": "session.created", "event_id": "event_1", "session": {"model": "gpt-realtime-2025-08-28"}}
        flow.websocket.messages.append(WebSocketMessage(1, False, json.dumps(session).encode()))
        gateway.websocket_message(flow)
        costs = []
        # response.done bills on every call (tens of µs), so fewer calls take as long.
        done_iterations = max(1, args.hook_iterations // 10)
        for name, frames in realtime_frames(args, 5 * done_iterations).items():
            iterations = done_iterations if name == "response.done" else args.hook_iterations
            gateway_us = time_hook(gateway.websocket_message, flow, frames, iterations)
            costs.append(
                HookCost(
                    name, gateway_us, time_hook(empty.websocket_message, flow, frames, iterations), targets.get(name)
                )
            )
            if name == "response.done":
                require_billed(gateway, 5 * iterations)
        gateway.websocket_end(flow)
    return costs


def require_billed(gateway: Gateway, responses: int) -> None:
    """A hook that silently stopped metering (a policy not loaded, a failing meter) would time as
    fast as an empty one: make sure every response.done was counted."""
    text = generate_latest(gateway.metrics.registry).decode()
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith("_gen_ai_client_responses_total")
    )
    if counted != responses:
        raise RuntimeError(f"the hook microbenchmark metered {counted:g} of {responses} response.done frames")
