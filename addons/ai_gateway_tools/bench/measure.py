"""What every benchmark measures with: a proxy process's RSS and CPU, rounds in serpentine order,
and the median-and-range figures the reports print.

These machines are shared and noisy, so absolute figures drift from run to run; what holds is a
comparison made within one run: configurations take turns round by round in serpentine order
(A B C D, D C B A, ...) so that a linear drift in machine load weighs on each alike.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator, Sequence

import psutil

from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.loadgen import Traffic

MB = 1e6
SETTLE = 0.3  # seconds for mitmproxy to finish a closed flow before its RSS is read


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / MB


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def proxy_process(proxy: GatewayProcess | None) -> psutil.Process | None:
    return None if proxy is None or proxy.process is None else psutil.Process(proxy.process.pid)


def serpentine[T](configs: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """Forward on even rounds, backward on odd ones: a linear drift averages out over each pair."""
    for r in range(rounds):
        for config in configs if r % 2 == 0 else reversed(configs):
            yield r, config


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def spread(values: Sequence[float], digits: int = 2) -> str:
    """The median, with the range over rounds when there is more than one."""
    middle = f"{statistics.median(values):.{digits}f}"
    return middle if len(values) < 2 else f"{middle} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def traffic(args: argparse.Namespace, append_interval: float = 0.0) -> Traffic:
    """The shape of a turn, from the command line's sizes."""
    return Traffic(
        appends=args.appends, append_ms=args.append_ms, audio_deltas=args.audio_deltas, append_interval=append_interval
    )
