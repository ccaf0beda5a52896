"""The per-frame hook timing itself, for any tree of the gateway: Gateway.websocket_message on the
frames of a Realtime session in mitmproxy's test context, against an empty hook called the same way.

Only the standard library, mitmproxy and prometheus_client are imported here, and the gateway is
loaded from a tree's `addons/gateway.py` as `mitmdump -s` loads it, so the module works against
any commit: hooks.py times the current tree with it in-process, and `scripts/bench --baseline REV`
runs it as a script in a child process per tree (`python probe.py JOB.json`: the job names the
tree, the options and the frames; the costs come back as JSON on stdout), so that two versions of
`ai_gateway` never meet in one interpreter.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import runpy
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

REPEATS = 5  # timings per hook and frame kind; the median is reported
SESSION_CREATED = {"type": "session.created", "event_id": "event_1", "session": {"model": "gpt-realtime-2025-08-28"}}


class EmptyHook:
    """The floor: a websocket_message hook that does nothing, called the same way."""

    def websocket_message(self, flow: Any) -> None:
        pass


def load_gateway(tree: Path) -> Any:
    """The tree's addon, as `mitmdump -s TREE/addons/gateway.py` loads it (the script puts its own
    directory first on sys.path)."""
    (gateway,) = runpy.run_path(str(tree / "addons" / "gateway.py"))["addons"]
    return gateway


def session_hooks(gateway: Any) -> Any:
    """The addon with the WebSocket hooks: the gateway's session metering, or (a tree from before
    the gateway was split into addons) the gateway itself."""
    return getattr(gateway, "session_metering", gateway)


@contextlib.contextmanager
def realtime_session(gateway: Any, policy: Path, options: Mapping[str, Any]) -> Iterator[Any]:
    """A Realtime flow through the gateway, after its session.created, in mitmproxy's test context.

    The test context configures only the options it is given (mitmproxy's startup configures them
    all), so the caller names those that matter, such as the access log's default; options the
    gateway does not declare (an older tree) are left out. No metrics endpoint; stdout (the access
    log's lines) goes to /dev/null meanwhile."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), taddons.context(gateway) as context:
        chosen = {name: value for name, value in options.items() if name in context.options}
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(policy), **chosen)
        flow = tflow.twebsocketflow()
        assert flow.websocket is not None
        flow.request.path = "/v1/realtime?model=gpt-realtime"
        del flow.websocket.messages[:]
        hooks = session_hooks(gateway)
        hooks.websocket_start(flow)
        flow.websocket.messages.append(WebSocketMessage(1, False, json.dumps(SESSION_CREATED).encode()))
        hooks.websocket_message(flow)
        yield flow
        hooks.websocket_end(flow)


def time_hook(hook: Callable[[Any], None], flow: Any, frames: Sequence[WebSocketMessage], iterations: int) -> float:
    """Microseconds per call, the median of REPEATS; each call sees the next frame appended as mitmproxy does."""
    messages = flow.websocket.messages
    per_call = []
    sent = 0
    for _ in range(REPEATS):
        started = time.perf_counter_ns()
        for _ in range(iterations):
            messages.append(frames[sent % len(frames)])
            sent += 1
            hook(flow)
        per_call.append((time.perf_counter_ns() - started) / iterations / 1000)
        del messages[:]
    return statistics.median(per_call)


def billed(gateway: Any) -> float:
    """Responses the gateway has counted: a hook that silently stopped metering (a policy not loaded,
    a failing meter) would time as fast as an empty one."""
    text = generate_latest(getattr(gateway, "state", gateway).metrics.registry).decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith("_gen_ai_client_responses_total")
    )


def time_frames(
    gateway: Any, flow: Any, frames: Mapping[str, Sequence[WebSocketMessage]], iterations: Mapping[str, int]
) -> dict[str, tuple[float, float]]:
    """(gateway µs, empty hook µs) per frame kind; every response.done must be billed."""
    empty = EmptyHook()
    costs = {}
    for name, sample in frames.items():
        before = billed(gateway)
        gateway_us = time_hook(session_hooks(gateway).websocket_message, flow, sample, iterations[name])
        costs[name] = (gateway_us, time_hook(empty.websocket_message, flow, sample, iterations[name]))
        counted = billed(gateway) - before
        expected = REPEATS * iterations[name] if name.startswith("response.done") else 0
        if counted != expected:
            raise RuntimeError(f"the hook microbenchmark metered {counted:g} of {expected} {name} frames")
    return costs


# --- as a child process, for one tree: `python probe.py JOB.json` --------------------------------


def job(
    tree: Path,
    options: Mapping[str, Any],
    frames: Mapping[str, Sequence[WebSocketMessage]],
    iterations: Mapping[str, int],
) -> str:
    """What the child process is given, as JSON: the frames as base64, with which side sent them."""
    encoded = {
        name: [[m.from_client, base64.b64encode(m.content).decode()] for m in sample] for name, sample in frames.items()
    }
    return json.dumps({"tree": str(tree), "options": dict(options), "frames": encoded, "iterations": dict(iterations)})


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    tree = Path(spec["tree"])
    frames = {
        name: [WebSocketMessage(1, from_client, base64.b64decode(content)) for from_client, content in sample]
        for name, sample in spec["frames"].items()
    }
    iterations = {name: int(n) for name, n in spec["iterations"].items()}
    gateway = load_gateway(tree)
    policy = tree / "policies" / "openai.yaml"
    with realtime_session(gateway, policy, spec["options"]) as flow:
        costs = time_frames(gateway, flow, frames, iterations)
    json.dump(costs, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
