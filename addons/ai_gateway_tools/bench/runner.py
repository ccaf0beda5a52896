"""One run of scripts/bench: the hook microbenchmark, then the relay and memory benchmarks against
one simulated upstream, with a progress bar and the accounting checked as it goes."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ai_gateway_tools.bench.checks import Checks
from ai_gateway_tools.bench.configs import CONFIGS, RUN_ORDER, Workdir
from ai_gateway_tools.bench.hooks import BaselineHookCost, HookCost, baseline_hook_costs, hook_costs
from ai_gateway_tools.bench.memory import MemoryRun, memory
from ai_gateway_tools.bench.relay import RelayRound, relay
from ai_gateway_tools.loadgen import UpstreamProcess, pcm16_bytes


@dataclass
class Results:
    relay: dict[str, list[RelayRound]] = field(default_factory=dict)
    memory: dict[str, MemoryRun] = field(default_factory=dict)
    hooks: list[HookCost] = field(default_factory=list)
    baseline_hooks: list[BaselineHookCost] = field(default_factory=list)  # with --baseline
    checks: Checks = field(default_factory=Checks)
    seconds: float = 0.0


class Bench:
    """One run: every phase, every configuration, results and accounting collected as it goes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = tqdm(total=self.steps(args), unit="step", file=sys.stderr, dynamic_ncols=True)
        self.configs = [c for c in RUN_ORDER if c.name in args.configs]
        self.results = Results()

    @staticmethod
    def steps(args: argparse.Namespace) -> int:
        """For the progress bar: the microbenchmark (and the baseline's), a warm-up and the rounds per
        configuration, and two memory phases per proxy."""
        configs = [c for c in CONFIGS if c.name in args.configs]
        proxied = sum(c.proxy is not None for c in configs)
        return 1 + (args.baseline_commit is not None) + len(configs) * (1 + int(args.rounds)) + 2 * proxied

    def run(self) -> Results:
        with self.progress:
            return self.measure()

    def measure(self) -> Results:
        started = time.perf_counter()
        self.progress.set_description("hook microbenchmark")
        self.results.hooks = hook_costs(self.args)
        self.progress.update()
        args, progress, checks = self.args, self.progress, self.results.checks
        simulator = UpstreamProcess(
            seed=args.seed, audio_bytes=pcm16_bytes(args.delta_ms), transcript_deltas=args.transcript_deltas
        )
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp, simulator as upstream:
            work = Workdir.create(Path(tmp), args.baseline_commit)
            if work.baseline is not None:
                progress.set_description("hook microbenchmark against the baseline")
                self.results.baseline_hooks = baseline_hook_costs(args, work.baseline)
                progress.update()
            self.results.relay = relay(self.configs, upstream, work, args, progress, checks)
            for config in self.configs:
                if config.proxy is not None:
                    self.results.memory[config.name] = memory(config, upstream, work, args, progress, checks)
        self.results.seconds = time.perf_counter() - started
        return self.results
