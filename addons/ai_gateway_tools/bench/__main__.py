"""scripts/bench: what the gateway costs on top of mitmproxy, measured side by side in one run.

These machines are shared and noisy, so absolute figures drift from run to run; what holds is a
comparison made within one run. Every relay figure is therefore measured for all configurations
in the same run, round after round, in serpentine order (relay.py), and the gateway is reported
as a ratio to bare mitmdump. Memory is measured on fresh processes (memory.py), and the per-frame
hook cost in-process (hooks.py). Every phase also checks the accounting (checks.py): a difference
makes the run fail. report.py writes BENCHMARKS.md and the RSS plot.

    python -m ai_gateway_tools.bench [--smoke] [--output FILE] [--configs …]   (what scripts/bench runs)
    python -m ai_gateway_tools.bench --capacity …   sessions per core (capacity.py; `--capacity --help`)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ai_gateway_tools.bench import capacity, limits
from ai_gateway_tools.bench.configs import BASELINE, CONFIGS, DEFAULT_CONFIGS, LITELLM, resolve_commit
from ai_gateway_tools.bench.litellm import install
from ai_gateway_tools.bench.report import PLOT_NAME, add_run_flags, add_sizes, document, parse_sized, plot, splice
from ai_gateway_tools.bench.runner import Bench

# The sizes of a run: flag, type, default, what it sizes.
SIZES: tuple[tuple[str, type, float, str], ...] = (
    ("--rounds", int, 8, "rounds over all configurations"),
    ("--seconds", float, 3, "per load, configuration and round"),
    ("--sessions", int, 8, "concurrent sessions, throughput"),
    ("--latency-sessions", int, 8, "paced sessions, latency"),
    ("--appends", int, 10, "client audio appends per turn"),
    ("--append-ms", float, 100, "audio per client append"),
    ("--audio-deltas", int, 24, "server audio deltas per response"),
    ("--delta-ms", float, 100, "audio per server delta"),
    ("--transcript-deltas", int, 6, "per response"),
    ("--soak-mb", float, 250, "payload of the long session"),
    ("--churn-sessions", int, 50, "sessions opened and closed"),
    ("--churn-turns", int, 2, "turns per churn session"),
    ("--hook-iterations", int, 200_000, "calls per hook timing"),
)
# What --smoke shrinks them to, where the command line does not set them.
SMOKE = {
    "rounds": 1,
    "seconds": 0.5,
    "sessions": 2,
    "latency_sessions": 2,
    "appends": 3,
    "audio_deltas": 6,
    "soak_mb": 3.0,
    "churn_sessions": 3,
    "churn_turns": 1,
    "hook_iterations": 200,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    add_run_flags(p)
    p.add_argument(
        "--capacity",
        action="store_true",
        help="instead: how many live voice sessions one core carries, per configuration (its own options: "
        "`scripts/bench --capacity --help`; its own section of BENCHMARKS.md)",
    )
    p.add_argument(
        "--limits",
        action="store_true",
        help="instead: what budgets and rate limits cost, in memory and in a shared Redis store "
        "(`scripts/bench --limits --help`; its own section of BENCHMARKS.md)",
    )
    p.add_argument(
        "--configs",
        default=",".join(c.name for c in DEFAULT_CONFIGS),
        help=f"comma-separated, of {', '.join(c.name for c in CONFIGS)} (default: %(default)s)",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run this commit's `mitmdump -s addons/gateway.py` (checked out with git archive into the run's "
        "temp directory) as the configuration `baseline`, and time its hooks against this tree's, round by round",
    )
    add_sizes(p, SIZES)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """--smoke shrinks every size the command line does not set, and never writes BENCHMARKS.md."""
    p = parser()
    args = parse_sized(p, argv, SMOKE, "bench-smoke-")
    args.configs = [name.strip() for name in args.configs.split(",")]
    unknown = set(args.configs) - {c.name for c in CONFIGS}
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    if args.baseline is not None:
        try:
            args.baseline_commit = resolve_commit(args.baseline)
        except ValueError as e:
            p.error(str(e))
        if BASELINE.name not in args.configs:
            args.configs.append(BASELINE.name)
    elif BASELINE.name in args.configs:
        p.error("the baseline configuration needs --baseline REV")
    else:
        args.baseline_commit = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--capacity" in argv:
        return capacity.main([arg for arg in argv if arg != "--capacity"])
    if "--limits" in argv:
        return limits.main([arg for arg in argv if arg != "--limits"])
    args = parse_args(argv)
    if LITELLM.name in args.configs:
        try:
            install()  # before the clock starts: the first time, this downloads LiteLLM
        except RuntimeError as e:
            print(f"scripts/bench: {e}", file=sys.stderr)
            return 2
    load = os.getloadavg()
    results = Bench(args).run()
    generated = document(results, args, argv, load)
    output: Path = args.output
    output.write_text(splice(output.read_text(encoding="utf-8") if output.exists() else None, generated))
    plot(results, output.parent / PLOT_NAME)
    print(generated)
    print(f"written: {output} and {output.parent / PLOT_NAME}")
    problems = [problem for found in results.checks.problems.values() for problem in found]
    for problem in problems:
        print(f"ACCOUNTING MISMATCH: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
