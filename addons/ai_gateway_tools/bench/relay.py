"""The relay side by side: every configuration's throughput (sessions in a closed loop) and latency
(sessions streaming audio in real time), measured in the same run, round after round in serpentine
order, so that the gateway can be reported as a ratio to bare mitmdump measured in the same round.

All proxies run at once, idle but for the one measured; the CPU seconds are the proxy process's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil
from tqdm import tqdm

from ai_gateway_tools.bench.checks import Checks
from ai_gateway_tools.bench.configs import Address, Config, Workdir, address, endpoint, model
from ai_gateway_tools.bench.measure import cpu_seconds, percentile, proxy_process, serpentine, traffic
from ai_gateway_tools.loadgen import LoadStats, Stop, UpstreamProcess

# The targets of issue #5; shown in BENCHMARKS.md, never asserted by timed tests.
THROUGHPUT_RATIO = 0.97
ADDED_P99_MS = 0.5


@dataclass
class RelayRound:
    """One configuration in one round: saturating throughput, then latency at a paced load."""

    throughput: LoadStats
    latency: LoadStats
    cpu_seconds: float | None  # of the proxy process during the throughput load


def relay_round(to: Address, model: str, proxy: psutil.Process | None, args: argparse.Namespace) -> RelayRound:
    """Closed-loop sessions as fast as the relay goes, then paced sessions streaming audio in real time."""
    before = cpu_seconds(proxy) if proxy else 0.0
    throughput = asyncio.run(
        to.drive(model, traffic(args), Stop(seconds=args.seconds), sessions=args.sessions, seed=args.seed)
    )
    used = cpu_seconds(proxy) - before if proxy else None
    paced = traffic(args, append_interval=args.append_ms / 1000)
    turn = paced.appends * paced.append_interval
    latency = asyncio.run(
        to.drive(model, paced, Stop(seconds=args.seconds), sessions=args.latency_sessions, seed=args.seed, spread=turn)
    )
    return RelayRound(throughput, latency, used)


def relay(
    configs: Sequence[Config],
    upstream: UpstreamProcess,
    work: Workdir,
    args: argparse.Namespace,
    progress: tqdm,
    checks: Checks,
) -> dict[str, list[RelayRound]]:
    """All configurations run at once (idle but for the one measured), alternated round by round."""
    rounds: dict[str, list[RelayRound]] = {}
    with contextlib.ExitStack() as stack:
        proxies = {c.name: stack.enter_context(endpoint(c, upstream, work)) for c in configs}
        received: dict[str, list[str]] = {c.name: [] for c in configs}
        for config in configs:  # the first sessions through a fresh process run slower
            progress.set_description(f"warm-up {config.name}")
            to = address(proxies[config.name], upstream)
            warm = asyncio.run(to.drive(model(config, "relay"), traffic(args), Stop(turns=2), sessions=2))
            received[config.name] += warm.usages
            progress.update()
        for r, config in serpentine(configs, args.rounds):
            progress.set_description(f"round {r + 1}/{args.rounds} {config.name}")
            proxy = proxies[config.name]
            measured = relay_round(address(proxy, upstream), model(config, "relay"), proxy_process(proxy), args)
            rounds.setdefault(config.name, []).append(measured)
            received[config.name] += measured.throughput.usages + measured.latency.usages
            progress.update()
        for config in configs:
            checks.check(config, upstream, "relay", received[config.name], proxies[config.name])
    return rounds


# --- figures of a round, for the report ---------------------------------------------------------

Figure = Callable[[RelayRound], float | None]


def messages_per_second(r: RelayRound) -> float:
    return r.throughput.frames_per_second


def latency_ms(q: float) -> Figure:
    """The q-th percentile of a round's latency samples."""
    return lambda r: percentile(r.latency.latencies, q) * 1000 if r.latency.latencies else None


def cpu_per_10k(r: RelayRound) -> float | None:
    return None if r.cpu_seconds is None else r.cpu_seconds / r.throughput.frames * 10_000
