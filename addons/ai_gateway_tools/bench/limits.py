"""What the spend controls cost (issue #12): `scripts/bench --limits`.

Three `scripts/serve` gateways side by side in every round, in serpentine order: without budgets
or limits; with a client-key budget and rate limits in this process's memory; and the same
limits in a shared Redis store (a real `redis-server` on loopback). The limits are set so high
that nothing is refused: what is measured is the checking. Per configuration and round:

- a WebSocket handshake: connect until `session.created` arrives (the store is asked at the handshake);
- a `response.create`: sent until its `response.created` arrives (the store is asked before the
  frame goes upstream), in an open session, one at a time;
- relay throughput: closed-loop voice sessions (appends, then a response of audio deltas) for a
  few seconds, messages per second.

Latency is reported as the p50 and p99 over all samples, and as added to the no-limits gateway's
in the same run; throughput as the per-round ratio to it (median, range).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect

from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway_tools.bench.measure import percentile, serpentine, spread
from ai_gateway_tools.bench.report import add_run_flags, add_sizes, parse_sized, splice, table
from ai_gateway_tools.harness import GatewayProcess, RedisServer
from ai_gateway_tools.loadgen import Stop, Traffic, UpstreamProcess, drive

BEGIN = "<!-- bench-limits:begin: written by scripts/bench --limits; text outside these markers is kept -->"
END = "<!-- bench-limits:end -->"
SIZES = [
    ("--rounds", int, 5, "rounds; every configuration runs once per round"),
    ("--handshakes", int, 40, "handshakes timed per configuration and round"),
    ("--creates", int, 60, "response.create timed per configuration and round"),
    ("--seconds", float, 3.0, "seconds of closed-loop relay per configuration and round"),
    ("--sessions", int, 8, "closed-loop sessions for the throughput figure"),
]
SMOKE = {"rounds": 1, "handshakes": 3, "creates": 3, "seconds": 0.5, "sessions": 2}
LIMITS = (
    "budgets:\n  client_key: {tokens: 1000000000000, usd: 1000000000}\n  reserve: {tokens: 4096, usd: 0.05}\n"
    "limits:\n  store: STORE\n  client_key:\n    requests_per_minute: 100000000\n"
    "    tokens_per_minute: 1000000000000\n    concurrent_sessions: 100000\n"
)
NAMES = ("off", "memory", "redis")
DESCRIPTIONS = {
    "off": "`scripts/serve`, default policy: no budgets or limits",
    "memory": "the same with a client-key budget and rate limits, `limits.store: memory`",
    "redis": "the same limits with `limits.store: redis://…` (a local `redis-server`, no persistence)",
}


@dataclass
class Samples:
    handshake: list[float] = field(default_factory=list)
    create: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)  # messages per second, one per round


def policy_text(store: str | None) -> str:
    """The default policy, with the benchmark's limits in `store` (None: without limits)."""
    base = DEFAULT_POLICY.read_text(encoding="utf-8")
    return base if store is None else LIMITS.replace("STORE", store) + base


async def handshakes(url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async with connect(url, compression=None) as ws:
            await ws.recv()  # session.created
            times.append(time.perf_counter() - started)
    return times


async def creates(url: str, count: int) -> list[float]:
    """response.create to its response.created, one at a time; each response is read to its end."""
    times = []
    create = json.dumps({"type": "response.create", "response": {"metadata": {"sim_deltas": "1"}}})
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.recv()
        for _ in range(count):
            started = time.perf_counter()
            await ws.send(create)
            while json.loads(await ws.recv())["type"] != "response.created":
                pass
            times.append(time.perf_counter() - started)
            while json.loads(await ws.recv())["type"] != "response.done":
                pass
    return times


def measure(gateway: GatewayProcess, args: argparse.Namespace, samples: Samples, model: str) -> None:
    url = gateway.url.replace("http://", "ws://", 1) + f"/v1/realtime?model={model}"
    samples.handshake += asyncio.run(handshakes(url, args.handshakes))
    samples.create += asyncio.run(creates(url, args.creates))
    traffic = Traffic(appends=10, audio_deltas=24)
    stats = asyncio.run(
        drive(gateway.url, model, traffic, Stop(seconds=args.seconds), sessions=args.sessions, compression=None)
    )
    samples.throughput.append(stats.frames_per_second)


def run(args: argparse.Namespace) -> dict[str, Samples]:
    results = {name: Samples() for name in NAMES}
    with (
        tempfile.TemporaryDirectory(prefix="bench-limits-") as temporary,
        RedisServer() as store,
        UpstreamProcess(uvloop=True, seed=args.seed) as upstream,
    ):
        directory = Path(temporary)
        stores = {"off": None, "memory": "memory", "redis": store.url}
        gateways = {}
        for name in NAMES:
            path = directory / f"{name}.yaml"
            path.write_text(policy_text(stores[name]))
            gateways[name] = GatewayProcess(upstream.url, launcher="serve", options={"gateway_policy": str(path)})
        for gateway in gateways.values():
            gateway.start()
        try:
            for n, name in serpentine(NAMES, args.rounds):
                measure(gateways[name], args, results[name], f"gpt-realtime-limits-{name}")
                print(f"round {n + 1}/{args.rounds}: {name} done", file=sys.stderr)
        finally:
            for gateway in gateways.values():
                gateway.stop()
    return results


def document(results: dict[str, Samples], args: argparse.Namespace, argv: Sequence[str], load: float) -> str:
    base = results["off"]
    rows = []
    for name in NAMES:
        r = results[name]
        cells = [f"**{name}**"]
        for mine, theirs in ((r.handshake, base.handshake), (r.create, base.create)):
            for q in (50, 99):
                ms, added = percentile(mine, q) * 1000, (percentile(mine, q) - percentile(theirs, q)) * 1000
                cells.append(f"{ms:.2f}" if name == "off" else f"{ms:.2f} ({added:+.2f})")
        ratios = [mine / theirs for mine, theirs in zip(r.throughput, base.throughput, strict=True)]
        cells.append(f"{statistics.median(r.throughput):,.0f}")
        cells.append("1" if name == "off" else spread(ratios, 3))
        rows.append(cells)
    header = [
        "configuration", "handshake p50 ms", "handshake p99 ms", "response.create p50 ms",
        "response.create p99 ms", "relay msg/s", "throughput vs off",
    ]  # fmt: skip
    described = "\n".join(f"- **{name}**: {DESCRIPTIONS[name]}" for name in NAMES)
    command = " ".join(["scripts/bench --limits", *argv])
    return (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}` "
        f"(load average {load:.2f} at the start): {args.rounds} rounds, {args.handshakes} handshakes and "
        f"{args.creates} `response.create` per configuration and round, {args.sessions} closed-loop sessions for "
        f"{args.seconds:g} s for throughput. Added latency (in brackets) is against **off** in the same run.\n\n"
        f"{described}\n\n" + table(header, rows)
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench --limits", description=__doc__.split("\n\n")[0])
    add_run_flags(p)
    add_sizes(p, SIZES)
    return p


def main(argv: Sequence[str]) -> int:
    args = parse_sized(parser(), argv, SMOKE, "bench-limits-smoke-")
    load = os.getloadavg()[0]
    generated = document(run(args), args, argv, load)
    output: Path = args.output
    output.write_text(splice(output.read_text(encoding="utf-8") if output.exists() else None, generated, BEGIN, END))
    print(generated)
    print(f"written: {output}")
    return 0
