"""The per-frame hook cost: Gateway.websocket_message on Realtime frames, in process (mitmproxy's
test context, probe.py), against an empty hook called the same way, so that only the gateway's own work counts.

response.done is timed three ways: with the default options (the text access log, its lines
written to /dev/null), with the access log off, and with the JSON access log and traces exported
to an OTLP/HTTP receiver in a child process (issue #16). `--baseline REV` times the current tree
and that commit's, each in a child process of its own, in alternating rounds (issue #13).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy.websocket import WebSocketMessage

from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway.proxy.addon import Gateway
from ai_gateway_tools.bench import probe
from ai_gateway_tools.bench.configs import ROOT
from ai_gateway_tools.bench.measure import traffic
from ai_gateway_tools.loadgen import audio_base64
from ai_gateway_tools.simulators.realtime import EXAMPLE_USAGE, GA

# The targets of issue #5; shown in BENCHMARKS.md, never asserted by timed tests.
HOOK_DELTA_US = 3.0
HOOK_DONE_US = 30.0
# The test context configures only the options it is given: the access log's default, named.
DEFAULTS = {"gateway_access_log": "text"}


@dataclass(frozen=True)
class HookCost:
    frame: str
    gateway_us: float
    empty_us: float
    target_us: float | None


@dataclass(frozen=True)
class BaselineHookCost:
    """One frame kind, round by round: the gateway's cost over the empty hook's, now and at the baseline."""

    frame: str
    current_us: list[float]
    baseline_us: list[float]


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


def iterations(args: argparse.Namespace, names: list[str], share: int = 1) -> dict[str, int]:
    """Calls per timing: response.done bills on every call (tens of µs), so fewer calls take as long."""
    every = max(1, args.hook_iterations // share)
    return {name: max(1, every // 10) if name.startswith("response.done") else every for name in names}


def hook_costs(args: argparse.Namespace) -> list[HookCost]:
    """Gateway.websocket_message on a Realtime session in mitmproxy's test context, against an empty hook."""
    calls = iterations(args, ["server audio delta", "response.done"])
    frames = realtime_frames(args, probe.REPEATS * calls["response.done"])
    dones = {"response.done": frames.pop("response.done")}
    targets = {"response.done": HOOK_DONE_US} | {name: HOOK_DELTA_US for name in frames if name.startswith("server")}
    with otlp_receiver() as collector:
        timed = (
            time_in_process(DEFAULTS, frames | dones, args)
            | renamed(time_in_process({"gateway_access_log": "off"}, dones, args), "access log off")
            | renamed(
                time_in_process({"gateway_access_log": "json", "gateway_otlp_endpoint": collector}, dones, args),
                "JSON access log and traces",
            )
        )
    return [HookCost(name, gateway_us, empty_us, targets.get(name)) for name, (gateway_us, empty_us) in timed.items()]


def renamed(costs: dict[str, tuple[float, float]], how: str) -> dict[str, tuple[float, float]]:
    return {f"{name}, {how}": cost for name, cost in costs.items()}


def time_in_process(
    options: Mapping[str, str], frames: dict[str, list[WebSocketMessage]], args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    """A fresh gateway and session per set of options (a response id is billed once per session)."""
    gateway = Gateway()
    with probe.realtime_session(gateway, DEFAULT_POLICY, options) as flow:
        return probe.time_frames(gateway, flow, frames, iterations(args, list(frames)))


@contextlib.contextmanager
def otlp_receiver() -> Iterator[str]:
    """A loopback OTLP/HTTP receiver in a child process (as a collector is): its base URL."""
    command = [sys.executable, "-m", "ai_gateway_tools.simulators.otlp"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as collector:
        assert collector.stdout is not None
        try:
            yield collector.stdout.readline().split()[-1]
        finally:
            collector.terminate()


# --- against an earlier commit (--baseline) -------------------------------------------------------

BASELINE_FRAMES = ("server audio delta", "client audio append", "response.done")
BASELINE_SHARE = 4  # of --hook-iterations per child-process timing: two trees, every round


def baseline_hook_costs(args: argparse.Namespace, baseline: Path) -> list[BaselineHookCost]:
    """This tree and the baseline's, each timed by probe.py in a child process of its own, with
    their default options, in alternating order round by round; the same frames for both."""
    calls = iterations(args, list(BASELINE_FRAMES), BASELINE_SHARE)
    frames = realtime_frames(args, probe.REPEATS * calls["response.done"])
    chosen = {name: frames[name] for name in BASELINE_FRAMES}
    trees = {"current": ROOT, "baseline": baseline}
    added: dict[str, dict[str, list[float]]] = {label: {} for label in trees}
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        jobs = {label: Path(tmp) / f"{label}.json" for label in trees}
        for label, tree in trees.items():
            jobs[label].write_text(probe.job(tree, DEFAULTS, chosen, calls), encoding="utf-8")
        for r in range(int(args.rounds)):
            for label in list(trees) if r % 2 == 0 else reversed(list(trees)):
                for name, (gateway_us, empty_us) in probe_child(trees[label], jobs[label]).items():
                    added[label].setdefault(name, []).append(gateway_us - empty_us)
    return [BaselineHookCost(name, added["current"][name], added["baseline"][name]) for name in BASELINE_FRAMES]


def probe_child(tree: Path, job: Path) -> dict[str, tuple[float, float]]:
    """probe.py as a script, with the tree's addons first on the path (as its gateway.py puts them);
    `-P`: not the script's own folder, whose module names (profile.py) would shadow others."""
    env = {**os.environ, "PYTHONPATH": str(tree / "addons")}
    command = [sys.executable, "-P", probe.__file__, str(job)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the hook probe of {tree} failed:\n{result.stderr}")
    costs: dict[str, Any] = json.loads(result.stdout)
    return {name: (float(g), float(e)) for name, (g, e) in costs.items()}


def ratios(cost: BaselineHookCost) -> list[float]:
    """Current ÷ baseline, round by round."""
    return [c / b for c, b in zip(cost.current_us, cost.baseline_us, strict=True) if b > 0]
