"""What scripts/bench writes: the Markdown tables (every comparison made between runs of the same
round), spliced into BENCHMARKS.md between its markers, and the plot of RSS over time."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import operator
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import psutil

from ai_gateway_tools.bench.configs import (
    BASELINE,
    CONFIGS,
    DIRECT,
    GATEWAY,
    MITMDUMP,
    SERVE,
    SERVE_GUARDED,
    SERVE_GUARDED_REGEX,
    SERVE_OBSERVED,
    SERVE_QUIET,
    Config,
)
from ai_gateway_tools.bench.hooks import ratios as hook_ratios
from ai_gateway_tools.bench.measure import spread
from ai_gateway_tools.bench.memory import CHURN_GROWTH_MB, SOAK_GROWTH_MB
from ai_gateway_tools.bench.relay import (
    ADDED_P99_MS,
    THROUGHPUT_RATIO,
    Figure,
    cpu_per_10k,
    latency_ms,
    messages_per_second,
)
from ai_gateway_tools.bench.runner import Results
from ai_gateway_tools.loadgen import pcm16_bytes

ROOT = Path(__file__).resolve().parents[3]
BENCHMARKS = ROOT / "BENCHMARKS.md"
# Configurations compared with each other rather than with mitmdump, round by round: (configuration,
# its base, the lowest msg/s ratio the issue allows).
PAIRS: tuple[tuple[Config, Config, float], ...] = (
    (GATEWAY, BASELINE, THROUGHPUT_RATIO),  # issue #13: no regression against the tree before the hardening
    (SERVE_OBSERVED, SERVE_QUIET, 0.95),  # issue #16: the access log and traces cost at most 5 %
    (SERVE_GUARDED, SERVE, 0.95),  # issue #24: guardrails (a pattern, a moderation service) cost at most 5 %
    (SERVE_GUARDED_REGEX, SERVE, 0.95),  # the pattern alone: the guards' own cost, without a service call
)
HOOK_RATIO = 1.0  # issue #13: no regression of the hook cost against the baseline
PLOT_NAME = "bench-rss.png"
BEGIN = "<!-- bench:begin: written by scripts/bench; text outside these markers is kept -->"
END = "<!-- bench:end -->"


def add_sizes(p: argparse.ArgumentParser, sizes: Sequence[tuple[str, type, object, str]]) -> None:
    """A benchmark's size flags, then the seed every benchmark takes."""
    for flag, kind, default, about in sizes:
        p.add_argument(flag, type=kind, default=default, help=f"{about} (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the simulator's usage numbers and the audio noise")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """--smoke and --output, which every benchmark takes and parse_sized reads."""
    p.add_argument("--smoke", action="store_true", help="a few seconds' run for CI; writes to a new temp directory")
    p.add_argument("--output", type=Path, help="the Markdown file to write (default: BENCHMARKS.md)")


def parse_sized(
    p: argparse.ArgumentParser, argv: Sequence[str], smoke: dict[str, object], prefix: str
) -> argparse.Namespace:
    """--smoke shrinks every size the command line does not set, and never writes BENCHMARKS.md."""
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
        if args.output is None:
            args.output = Path(tempfile.mkdtemp(prefix=prefix)) / "BENCHMARKS.md"
    args.output = args.output or BENCHMARKS
    return args


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


@dataclass(frozen=True)
class Target:
    goal: str
    value: float
    limit: float
    unit: str = ""
    at_least: bool = False  # the limit is a floor, not a ceiling

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


class Report:
    """Figures derived from the results: medians over rounds of per-round figures, and every
    comparison (ratio to mitmdump, latency added to direct) made between runs of the same round."""

    def __init__(self, results: Results) -> None:
        self.results = results

    def per_round(self, name: str, figure: Figure) -> list[float]:
        return [value for r in self.results.relay.get(name, []) if (value := figure(r)) is not None]

    def paired(self, name: str, base: Config, figure: Figure, combine: Callable[[float, float], float]) -> list[float]:
        """`combine(figure of name, figure of base)` round by round: both measured within the same minute."""
        pairs = zip(self.results.relay.get(name, []), self.results.relay.get(base.name, []), strict=False)
        return [combine(a, b) for x, y in pairs if (a := figure(x)) is not None and (b := figure(y)) is not None]

    def ratios(self, name: str, figure: Figure) -> list[float]:
        return self.paired(name, MITMDUMP, figure, operator.truediv)

    def accounting(self, name: str) -> str:
        checks = self.results.checks
        problems = checks.problems.get(name)
        if problems is None:
            return "—"
        if problems:
            return f"MISMATCH: {'; '.join(problems)}"
        relayed = f"exact ({checks.responses.get(name, 0)} responses)"
        metered = checks.peer.get(name)
        return relayed if metered is None else f"relay {relayed}; {metered.summary()}"

    def relay_table(self) -> str:
        rows = []
        for name, _ in ordered(self.results.relay):
            rows.append(
                [
                    f"**{name}**",
                    spread(self.per_round(name, messages_per_second), 0),
                    spread(self.per_round(name, lambda r: r.throughput.megabytes_per_second), 1),
                    _or_dash(self.ratios(name, messages_per_second)),
                    *(_or_dash(self.per_round(name, latency_ms(q))) for q in (50, 99)),
                    *(_or_dash(self.paired(name, DIRECT, latency_ms(q), operator.sub)) for q in (50, 99)),
                    _or_dash(self.per_round(name, cpu_per_10k)),
                    _or_dash(self.ratios(name, cpu_per_10k)),
                    self.accounting(name),
                ]
            )
        header = [
            "configuration", "msg/s", "MB/s", "msg/s vs mitmdump", "latency p50 (ms)", "p99 (ms)",
            "added p50 vs direct (ms)", "added p99 vs direct (ms)", "CPU s / 10k frames", "CPU vs mitmdump",
            "accounting (all phases)",
        ]  # fmt: skip
        return table(header, rows)

    def memory_table(self) -> str:
        rows = []
        for name, run in ordered(self.results.memory):
            first, last = (run.churn[0], run.churn[-1]) if run.churn else (0.0, 0.0)
            rows.append(
                [
                    f"**{name}**",
                    f"{run.soak_megabytes:.0f}",
                    f"{run.soak_baseline:.1f}",
                    f"{run.soak_peak:.1f}",
                    f"{run.soak_final:.1f}",
                    f"**{run.soak_peak - run.soak_baseline:+.1f}**",
                    f"{first:.1f}",
                    f"{last:.1f}",
                    f"**{last - first:+.1f}**",
                ]
            )
        sessions = len(next(iter(self.results.memory.values())).churn) if self.results.memory else 0
        header = [
            "configuration", "long session: MB relayed", "RSS before (MB)", "peak (MB)", "after close (MB)",
            "growth (peak − before)", "churn: RSS after session 1 (MB)", f"after session {sessions} (MB)",
            "growth after the first",
        ]  # fmt: skip
        return table(header, rows)

    def hook_table(self) -> str:
        rows = [
            [
                cost.frame,
                f"{cost.gateway_us:.2f}",
                f"{cost.empty_us:.2f}",
                f"**{cost.gateway_us - cost.empty_us:.2f}**",
                f"< {cost.target_us:g}" if cost.target_us else "—",
            ]
            for cost in self.results.hooks
        ]
        header = ["frame", "Gateway.websocket_message (µs)", "empty hook (µs)", "gateway − empty (µs)", "target (µs)"]
        return table(header, rows)

    def pairs(self) -> list[tuple[Config, Config, float]]:
        return [
            (c, base, floor)
            for c, base, floor in PAIRS
            if c.name in self.results.relay and base.name in self.results.relay
        ]

    def pairs_table(self) -> str:
        rows = [
            [
                f"**{c.name}** ÷ **{base.name}**",
                _or_dash(self.paired(c.name, base, messages_per_second, operator.truediv)),
                _or_dash(self.paired(c.name, base, cpu_per_10k, operator.truediv)),
                _or_dash(self.paired(c.name, base, latency_ms(99), operator.sub)),
            ]
            for c, base, _ in self.pairs()
        ]
        header = ["comparison", "msg/s ratio", "CPU per frame ratio", "p99 latency difference (ms)"]
        return table(header, rows)

    def baseline_hook_table(self) -> str:
        rows = [
            [
                cost.frame,
                spread(cost.current_us),
                spread(cost.baseline_us),
                f"**{spread(hook_ratios(cost))}**",
            ]
            for cost in self.results.baseline_hooks
        ]
        header = ["frame", "now − empty (µs)", "baseline − empty (µs)", "now ÷ baseline"]
        return table(header, rows)

    def targets(self) -> list[Target]:
        found = []
        for name in (c.name for c in CONFIGS if c.metered):
            if ratios := self.ratios(name, messages_per_second):
                found.append(
                    Target(f"{name}: msg/s ÷ mitmdump's", statistics.median(ratios), THROUGHPUT_RATIO, "", True)
                )
            if added := self.paired(name, MITMDUMP, latency_ms(99), operator.sub):
                found.append(Target(f"{name}: p99 latency − mitmdump's", statistics.median(added), ADDED_P99_MS, " ms"))
            if (run := self.results.memory.get(name)) is not None:
                growth = run.soak_peak - run.soak_baseline
                found.append(
                    Target(
                        f"{name}: RSS growth, one {run.soak_megabytes:.0f} MB session", growth, SOAK_GROWTH_MB, " MB"
                    )
                )
                if run.churn:
                    growth = run.churn[-1] - run.churn[0]
                    goal = f"{name}: RSS growth after the first of {len(run.churn)} sessions"
                    found.append(Target(goal, growth, CHURN_GROWTH_MB, " MB"))
        for cost in self.results.hooks:
            if cost.target_us is not None:
                found.append(Target(f"hook cost, {cost.frame}", cost.gateway_us - cost.empty_us, cost.target_us, " µs"))
        for c, base, floor in self.pairs():
            if ratios := self.paired(c.name, base, messages_per_second, operator.truediv):
                found.append(Target(f"{c.name}: msg/s ÷ {base.name}'s", statistics.median(ratios), floor, "", True))
        for cost in self.results.baseline_hooks:
            found.append(
                Target(f"hook cost ÷ baseline's, {cost.frame}", statistics.median(hook_ratios(cost)), HOOK_RATIO)
            )
        return found

    def targets_table(self) -> str:
        rows = [
            [
                t.goal,
                f"{t.value:.2f}{t.unit}",
                f"{'≥' if t.at_least else '≤'} {t.limit:g}{t.unit}",
                "met" if t.met else "**missed**",
            ]
            for t in self.targets()
        ]
        return table(["target", "measured", "goal", ""], rows)


def ordered[T](by_config: dict[str, T]) -> list[tuple[str, T]]:
    """Results in the order of CONFIGS (they were collected in the order they ran)."""
    return [(c.name, by_config[c.name]) for c in CONFIGS if c.name in by_config]


def _or_dash(values: Sequence[float]) -> str:
    return spread(values) if values else "—"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {memory:.0f} GiB; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, mitmproxy {version('mitmproxy')}, websockets {version('websockets')}"
    )


def document(results: Results, args: argparse.Namespace, argv: Sequence[str], load: tuple[float, ...]) -> str:
    """The generated part of BENCHMARKS.md: how it was measured, then the tables."""
    report = Report(results)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["scripts/bench", *argv])
    shape = (
        f"{args.appends} client appends of {args.append_ms:g} ms ({pcm16_bytes(args.append_ms)} bytes PCM16) per turn, "
        f"then a response of {args.audio_deltas} audio deltas of {args.delta_ms:g} ms, "
        f"{args.transcript_deltas} transcript deltas and `response.done`"
    )
    return f"""
Measured {when} with `{command}` in {results.seconds:.0f} s on a **shared** machine (other
work may run beside it; load average {load[0]:.2f} at the start): {machine()}.

Traffic: {shape}. Throughput: {args.sessions} sessions in a closed loop for {args.seconds:g} s per configuration
and round; latency: {args.latency_sessions} sessions streaming their audio in real time for {args.seconds:g} s,
each server frame timed from the client's `response.create`. {args.rounds} rounds in serpentine order. Every
figure is message payload, both directions; clients offer permessage-deflate.

{configurations(args.configs)}

### Relay (medians over rounds, range in brackets; ratios are per round, against mitmdump in the same round)

{report.relay_table()}

### Memory (the proxy's RSS; each phase on a fresh process)

{report.memory_table()}

![RSS over time]({PLOT_NAME})

### Per-frame hook cost (in-process, mitmproxy's test context; median of 5 repeats)

{report.hook_table()}
{comparisons(report, args)}
### Targets (issues #5, #13, #16)

{report.targets_table()}
"""


def comparisons(report: Report, args: argparse.Namespace) -> str:
    """The sections of the pairs and of the baseline's hooks, where the run has them."""
    text = ""
    if report.pairs():
        text += f"""
### Side by side (median over rounds of per-round ratios, range in brackets)

{report.pairs_table()}
"""
    if report.results.baseline_hooks:
        text += f"""
### Hook cost against the baseline (`--baseline {args.baseline}`: commit {args.baseline_commit[:7]})

Each tree timed by `probe.py` in a child process of its own, with its default options (this tree's
text access log written to /dev/null), {args.rounds} rounds in alternating order; the gateway's cost
over the empty hook's, median over rounds with the range, and the ratio round by round.

{report.baseline_hook_table()}
"""
    return text


def configurations(names: Sequence[str]) -> str:
    return "\n".join(f"- **{c.name}**: {c.description}" for c in CONFIGS if c.name in names)


def splice(existing: str | None, generated: str, begin: str = BEGIN, end: str = END) -> str:
    """Replace what lies between the markers, keeping the hand-written analysis around them (and every
    other section's markers); a file without these markers gets the block at its end."""
    block = f"{begin}\n{generated}\n{end}"
    if existing and begin in existing and end in existing:
        head, rest = existing.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if existing:
        return f"{existing.rstrip()}\n\n{block}\n"
    return f"# Benchmarks\n\n{block}\n"


def plot(results: Results, path: Path) -> None:
    """RSS over time during the long session, and after each short session of the churn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    figure, (soaked, churned) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for name, run in ordered(results.memory):
        soaked.plot(
            [t for t, _ in run.soak], [rss for _, rss in run.soak], label=f"{name} ({run.soak_megabytes:.0f} MB)"
        )
        churned.plot(range(1, len(run.churn) + 1), run.churn, marker=".", label=name)
    soaked.set(title="One long session", xlabel="seconds", ylabel="RSS (MB)")
    churned.set(title="Sessions opened and closed in turn", xlabel="sessions closed", ylabel="RSS (MB)")
    churned.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (soaked, churned):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
