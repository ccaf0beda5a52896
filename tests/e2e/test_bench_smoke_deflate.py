"""`scripts/bench --smoke`, relay run `deflate` (tests/e2e/bench_smoke.py): exact accounting in every row."""

from __future__ import annotations

from pathlib import Path

import pytest

from .bench_smoke import SMOKE_RUNS, relay_smoke


@pytest.mark.slow
def test_smoke_run_writes_a_table_with_exact_accounting(tmp_path: Path) -> None:
    relay_smoke(tmp_path, SMOKE_RUNS["deflate"])
