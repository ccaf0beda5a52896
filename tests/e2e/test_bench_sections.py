"""`scripts/bench --capacity --smoke` and `scripts/bench --limits --smoke`: each writes its own
section of the output file and leaves the relay block as it was."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ai_gateway_tools.bench import capacity, limits

from .bench_smoke import bench


def smoke_section(tmp_path: Path, mode: str, begin: str, end: str, in_process: bool = False) -> str:
    """The mode's own section (between its markers) after its smoke run; the relay block is left as it was."""
    text = bench(tmp_path, mode, "--smoke", timeout=120, in_process=in_process)
    assert "relay tables" in text
    return text.split(begin, 1)[1].split(end, 1)[0]


@pytest.mark.slow
def test_capacity_smoke_writes_its_own_section_and_plot(tmp_path: Path) -> None:
    section = smoke_section(tmp_path, "--capacity", capacity.BEGIN, capacity.END)
    for name in ("serve", "mitmdump"):
        assert f"| **{name}** | **" in section
        steps = [line for line in section.splitlines() if line.startswith(f"| {name} | ")]
        assert len(steps) >= 1 and all("exact, none lost" in line for line in steps)
    assert "scripts/bench --capacity --smoke" in section
    assert (tmp_path / capacity.PLOT_NAME).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_limits_smoke_writes_its_own_section(tmp_path: Path) -> None:
    # In the worker: its three serve gateways are forked, and the bench's imports are the worker's.
    section = smoke_section(tmp_path, "--limits", limits.BEGIN, limits.END, in_process=True)
    rows = {line.split(" | ")[0].strip("| *"): line for line in section.splitlines() if line.startswith("| **")}
    assert set(rows) == set(limits.NAMES)
    assert re.search(r"\| \d[\d.]* \([+-]\d", rows["redis"])  # a latency with what it adds to off's
    assert "scripts/bench --limits --smoke" in section
