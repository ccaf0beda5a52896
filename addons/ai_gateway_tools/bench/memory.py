"""The proxy's memory: RSS through one long session (the soak), and after each of many short
sessions opened and closed in turn (the churn). Each phase runs on a fresh process, so that its
baseline is clean.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import psutil
from tqdm import tqdm

from ai_gateway_tools.bench.checks import Checks
from ai_gateway_tools.bench.configs import Address, Config, Workdir, address, endpoint, model
from ai_gateway_tools.bench.measure import MB, SETTLE, proxy_process, rss_mb, traffic
from ai_gateway_tools.loadgen import Stop, UpstreamProcess

RSS_INTERVAL = 0.2  # seconds between RSS samples of a long session

# The targets of issue #5; shown in BENCHMARKS.md, never asserted by timed tests.
SOAK_GROWTH_MB = 20.0
CHURN_GROWTH_MB = 2.0  # "no growth after the first session", allowing for allocator noise


@dataclass
class MemoryRun:
    soak: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MB) during the long session
    soak_baseline: float = 0.0  # RSS MB before it, after a one-turn warm-up session
    soak_final: float = 0.0  # RSS MB after it closed
    soak_megabytes: float = 0.0  # payload relayed, both directions
    churn: list[float] = field(default_factory=list)  # RSS MB after each short session closed

    @property
    def soak_peak(self) -> float:
        return max((rss for _, rss in self.soak), default=self.soak_baseline)


async def soak(to: Address, model: str, process: psutil.Process, args: argparse.Namespace, run: MemoryRun) -> list[str]:
    """One session relaying `--soak-mb` of audio, RSS sampled throughout. Returns the usage received."""
    warm = await to.drive(model, traffic(args), Stop(turns=1), seed=args.seed)
    await asyncio.sleep(SETTLE)
    run.soak_baseline = rss_mb(process)
    started = time.perf_counter()

    async def sample() -> None:
        while True:
            run.soak.append((time.perf_counter() - started, rss_mb(process)))
            await asyncio.sleep(RSS_INTERVAL)

    sampler = asyncio.create_task(sample())
    try:
        stats = await to.drive(model, traffic(args), Stop(megabytes=args.soak_mb), seed=args.seed)
    finally:
        sampler.cancel()
    run.soak.append((time.perf_counter() - started, rss_mb(process)))
    await asyncio.sleep(SETTLE)
    run.soak_final = rss_mb(process)
    run.soak_megabytes = stats.bytes / MB
    return warm.usages + stats.usages


async def churn(
    to: Address, model: str, process: psutil.Process, args: argparse.Namespace, run: MemoryRun
) -> list[str]:
    """`--churn-sessions` short sessions opened and closed one after another; RSS after each."""

    async def sample(_: int) -> None:
        await asyncio.sleep(SETTLE)
        run.churn.append(rss_mb(process))

    stop = Stop(turns=args.churn_turns)
    stats = await to.drive(
        model, traffic(args), stop, sessions=args.churn_sessions, seed=args.seed, after_session=sample
    )
    return stats.usages


MEMORY_PHASES = {"soak": soak, "churn": churn}


def memory(
    config: Config, upstream: UpstreamProcess, work: Workdir, args: argparse.Namespace, progress: tqdm, checks: Checks
) -> MemoryRun:
    """A long session and a churn of short ones, each on a fresh process so that baselines are clean."""
    run = MemoryRun()
    for phase, measure in MEMORY_PHASES.items():
        progress.set_description(f"{phase} {config.name}")
        with endpoint(config, upstream, work) as proxy:
            process = proxy_process(proxy)
            assert proxy is not None and process is not None
            received = asyncio.run(measure(address(proxy, upstream), model(config, phase), process, args, run))
            checks.check(config, upstream, phase, received, proxy)
        progress.update()
    return run
