"""The launchers side by side on Realtime traffic (issue #8): stock mitmdump with the gateway
script against `scripts/serve`, on uvloop and on asyncio's loop, and with `--workers 2`.

Load: `sessions` concurrent Realtime sessions of `responses` responses each, plain `websockets`
clients, through the gateway to the project's simulator (`SimulatorThread(audio_deltas=5,
transcript_deltas=5)`: per response rate limits, created, 5 audio deltas of 6.4 KB, 5
transcript deltas, done). All configurations run at once, each on its own port, and take
turns round by round in serpentine order, so that a shared machine's noise spreads over all of
them; figures are medians over rounds. Every round checks the gateway's /metrics against the
simulator's ledger: a fast but wrong gateway fails instead of winning.

On a shared machine the gateway's CPU seconds are steadier than wall time; the load's own CPU
seconds show when the clients and the simulator, not the gateway, set the pace (on 2 cores they
take most of a core, which caps what `--workers 2` can show).

`dispatch_cost()` times mitmproxy's hook dispatch alone for one WebSocket message, in process.

    python -m ai_gateway_tools.bench.serve [--sessions 100] [--responses 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import psutil
from mitmproxy import hooks, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.master import Master
from mitmproxy.proxy.layers.websocket import WebsocketMessageHook
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster
from websockets.asyncio.client import connect

from ai_gateway.launcher.serve import GatewayMaster, HookDispatch
from ai_gateway.proxy.addon import Gateway
from ai_gateway_tools.bench.measure import cpu_seconds, rss_mb, serpentine
from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

CONFIGS: dict[str, dict[str, object]] = {
    "mitmdump": {},
    "serve": {"launcher": "serve"},
    "serve-asyncio": {"launcher": "serve", "args": ["--loop", "asyncio"]},
    "serve-workers2": {"launcher": "serve", "args": ["--workers", "2"]},
}
RESPONSES_TOTAL = "agentgateway_gen_ai_client_responses_total"


@dataclass
class Round:
    seconds: float
    cpu_seconds: float  # the gateway's processes (supervisor and workers) during the load
    load_cpu_seconds: float  # this process: the clients and the simulator, which share the machine's cores
    frames: int  # server frames the clients received


@dataclass
class Results:
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    rss_idle_mb: dict[str, list[float]] = field(default_factory=dict)  # per process, after startup
    rss_loaded_mb: dict[str, list[float]] = field(default_factory=dict)  # per process, after the last round


def process_tree(gateway: GatewayProcess) -> list[psutil.Process]:
    """The gateway's process and its children (a supervisor's workers)."""
    assert gateway.process is not None
    process = psutil.Process(gateway.process.pid)
    return [process, *process.children()]


def gateway_cpu(processes: Sequence[psutil.Process]) -> float:
    return sum(cpu_seconds(process) for process in processes)


async def session(url: str, responses: int) -> int:
    """One Realtime session: `responses` responses one after another; returns server frames received."""
    frames = 0
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # session.created
        for _ in range(responses):
            await ws.send('{"type": "response.create"}')
            done = False
            while not done:
                frame = await ws.recv()
                frames += 1
                done = '"response.done"' in frame[:40]
    return frames


async def load(http_url: str, model: str, sessions: int, responses: int) -> int:
    url = http_url.replace("http://", "ws://", 1) + f"/v1/realtime?model={model}"
    return sum(await asyncio.gather(*(session(url, responses) for _ in range(sessions))))


def run_round(gateway: GatewayProcess, simulator: Simulator, model: str, sessions: int, responses: int) -> Round:
    processes = process_tree(gateway)
    cpu_before, load_before, started = gateway_cpu(processes), time.process_time(), time.perf_counter()
    frames = asyncio.run(load(gateway.url, model, sessions, responses))
    seconds, cpu = time.perf_counter() - started, gateway_cpu(processes) - cpu_before
    load_cpu = time.process_time() - load_before
    metered = sum(v for (name, _), v in select(scrape(gateway.metrics_url), gen_ai_request_model=model).items()
                  if name == RESPONSES_TOTAL)  # fmt: skip
    sent = len(simulator.usage_for(model))
    if not metered == sent == sessions * responses:
        raise AssertionError(f"{model}: metered {metered}, upstream sent {sent}, expected {sessions * responses}")
    return Round(seconds, cpu, load_cpu, frames)


def process_rss(gateway: GatewayProcess) -> list[float]:
    return [rss_mb(process) for process in process_tree(gateway)]


def compare(
    configs: Sequence[str] = tuple(CONFIGS), sessions: int = 100, responses: int = 20, rounds: int = 5
) -> Results:
    """Run every configuration `rounds` times, alternating; see the module docstring."""
    results = Results()
    with SimulatorThread(audio_deltas=5, transcript_deltas=5) as simulator, contextlib.ExitStack() as stack:
        gateways = {
            name: stack.enter_context(GatewayProcess(simulator.url, **CONFIGS[name]))  # type: ignore[arg-type]
            for name in configs
        }
        results.rss_idle_mb = {name: process_rss(gateway) for name, gateway in gateways.items()}
        for n, name in serpentine(configs, rounds):
            measured = run_round(gateways[name], simulator, f"bench-{name}-{n}", sessions, responses)
            results.rounds.setdefault(name, []).append(measured)
            print(
                f"round {n} {name}: {measured.seconds:.2f} s, gateway {measured.cpu_seconds:.2f} CPU s, "
                f"load {measured.load_cpu_seconds:.2f} CPU s",
                file=sys.stderr,
            )
        results.rss_loaded_mb = {name: process_rss(gateway) for name, gateway in gateways.items()}
    return results


def dispatch_cost(messages: int = 20_000) -> dict[str, float]:
    """Microseconds mitmproxy spends dispatching one WebSocket message's hooks (the message's
    own, then `update`) to an unconfigured gateway, whose hook returns at once: stock mitmdump's
    addon chain and the lean chain, each with mitmproxy's dispatch and with HookDispatch's."""

    async def measure(master: Master, trigger: Callable[[AddonManager, hooks.Hook], Awaitable[None]]) -> float:
        flow = tflow.twebsocketflow()
        message, update = WebsocketMessageHook(flow), hooks.UpdateHook([flow])
        started = time.perf_counter()
        for _ in range(messages):
            await trigger(master.addons, message)
            await trigger(master.addons, update)
        return (time.perf_counter() - started) / messages * 1e6

    async def each() -> dict[str, float]:
        """One master at a time: mitmproxy's `ctx` holds the latest master's options."""
        timings = (
            ("mitmdump chain", lambda: DumpMaster(options.Options(), with_termlog=False, with_dumper=False),
             {"AddonManager": AddonManager.trigger_event}),
            ("lean chain", lambda: GatewayMaster(options.Options()),
             {"AddonManager": AddonManager.trigger_event, "HookDispatch": HookDispatch.trigger_event}),
        )  # fmt: skip
        costs = {}
        for chain, make, triggers in timings:
            master = make()
            master.addons.add(Gateway())
            for manager, trigger in triggers.items():
                costs[f"{chain}, {manager}"] = await measure(master, trigger)
            await master.done()  # takes down the log handlers the master installed
            master.addons.get("errorcheck").finish()
        return costs

    return asyncio.run(each())


def summary(results: Results) -> dict[str, dict[str, float]]:
    """Medians per configuration; time and CPU also as the median of per-round ratios to mitmdump."""
    out: dict[str, dict[str, float]] = {}
    baseline = results.rounds.get("mitmdump")
    for name, rounds in results.rounds.items():
        row = {
            "seconds": statistics.median(r.seconds for r in rounds),
            "cpu_seconds": statistics.median(r.cpu_seconds for r in rounds),
            "load_cpu_seconds": statistics.median(r.load_cpu_seconds for r in rounds),
            "frames_per_second": statistics.median(r.frames / r.seconds for r in rounds),
            "rss_idle_mb": max(results.rss_idle_mb[name]),
            "rss_loaded_mb": max(results.rss_loaded_mb[name]),
        }
        if baseline:
            row["time_vs_mitmdump"] = statistics.median(
                r.seconds / b.seconds for r, b in zip(rounds, baseline, strict=True)
            )
            row["cpu_vs_mitmdump"] = statistics.median(
                r.cpu_seconds / b.cpu_seconds for r, b in zip(rounds, baseline, strict=True)
            )
        out[name] = row
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--responses", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--dispatch-messages", type=int, default=20_000, help="messages timed by dispatch_cost")
    args = parser.parse_args(argv)
    results = compare(args.configs.split(","), args.sessions, args.responses, args.rounds)
    report = {
        "summary": summary(results),
        "rss_idle_mb_per_process": results.rss_idle_mb,
        "rss_loaded_mb_per_process": results.rss_loaded_mb,
        "dispatch_us_per_message": dispatch_cost(args.dispatch_messages),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
