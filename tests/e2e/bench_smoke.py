"""What the `scripts/bench --smoke` tests share: the relay smoke split into runs of a few
configurations each, one test module per run, so that pytest-xdist spreads them
over the workers instead of one worker running every configuration in turn.

A configuration added to the bench's defaults goes into one of SMOKE_RUNS (or a new run, with its own
three-line module `test_bench_smoke_NAME.py`); tests/e2e/test_bench.py checks that every default
configuration is in a run.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ai_gateway_tools.bench.__main__ import main
from ai_gateway_tools.bench.report import BEGIN, BENCHMARKS, PLOT_NAME, splice

# run name (its module: test_bench_smoke_NAME.py) -> the configurations it measures
SMOKE_RUNS: dict[str, tuple[str, ...]] = {
    "gateway": ("direct", "mitmdump", "gateway"),  # the relay and the ratios the targets are read from
    "deflate": ("gateway-deflate",),
    "serve": ("serve",),
}


def bench(tmp_path: Path, *options: str, timeout: float = 180, in_process: bool = False) -> str:
    """`scripts/bench OPTIONS` (a smoke run) into a file of tmp_path, which holds a relay block already;
    the file's text after the run, which exited 0 and left BENCHMARKS.md as it was. `in_process`
    runs it in the worker (`main`, as the command does), so that its gateways are the worker's
    forked ones and its imports are paid once per worker; the capacity run must stay a command of
    its own, since it pins its process (and the process's children) to a CPU."""
    before = BENCHMARKS.read_bytes() if BENCHMARKS.exists() else None
    output = tmp_path / "BENCH.md"
    output.write_text(splice(None, "relay tables"))
    argv = [*options, "--output", str(output)]
    if in_process:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main(argv)
        assert code == 0, printed.getvalue()
    else:
        command = [sys.executable, "-m", "ai_gateway_tools.bench", *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
    assert (BENCHMARKS.read_bytes() if BENCHMARKS.exists() else None) == before
    text = output.read_text()
    assert text.count(BEGIN) == 1
    return text


def relay_smoke(tmp_path: Path, configs: Sequence[str], *options: str) -> str:
    """The relay smoke of these configurations, in the worker: a row each with exact accounting,
    the hook table, the targets and the plot."""
    text = bench(tmp_path, "--smoke", "--configs", ",".join(configs), *options, in_process=True)
    assert "relay tables" not in text  # the relay block is this run's
    for name in configs:
        row = next(line for line in text.splitlines() if line.startswith(f"| **{name}** | ") and "exact" in line)
        assert "MISMATCH" not in row
    assert "| server audio delta |" in text and "| response.done |" in text
    assert "### Targets" in text and "scripts/bench --smoke" in text
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    return text
