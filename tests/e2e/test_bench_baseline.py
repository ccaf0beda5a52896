"""`scripts/bench --baseline REV` (issues #13 and #16): the tree of a commit as the configuration
`baseline`, its relay and its hooks compared with this tree's round by round."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ai_gateway_tools.bench.__main__ import parse_args
from ai_gateway_tools.bench.configs import ROOT, BaselineGateway, extract, resolve_commit
from ai_gateway_tools.bench.hooks import BASELINE_FRAMES, baseline_hook_costs

from .bench_smoke import relay_smoke

IN_GIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
needs_git = pytest.mark.skipif(not IN_GIT, reason="needs this checkout's git repository")


@pytest.mark.slow
@needs_git
def test_smoke_with_a_baseline_compares_it_round_by_round(tmp_path: Path) -> None:
    text = relay_smoke(tmp_path, ["gateway"], "--baseline", "HEAD")
    assert next(line for line in text.splitlines() if line.startswith("| **baseline** | ") and "exact" in line)
    assert "| **gateway** ÷ **baseline** | " in text
    assert "### Hook cost against the baseline (`--baseline HEAD`" in text
    for frame in BASELINE_FRAMES:
        assert f"| hook cost ÷ baseline's, {frame} | " in text
    assert "| gateway: msg/s ÷ baseline's | " in text


@needs_git
def test_baseline_is_resolved_and_needs_its_option(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--baseline", "HEAD", "--configs", "mitmdump"])
    assert len(args.baseline_commit) == 40 and args.configs == ["mitmdump", "baseline"]
    assert parse_args([]).baseline_commit is None
    with pytest.raises(SystemExit):
        parse_args(["--baseline", "no-such-commit-anywhere"])
    with pytest.raises(SystemExit):
        parse_args(["--configs", "gateway,baseline"])
    assert "needs --baseline" in capsys.readouterr().err


@needs_git
def test_the_baseline_tree_is_the_commits_and_runs_its_own_script(tmp_path: Path) -> None:
    commit = resolve_commit("HEAD")
    tree = extract(commit, tmp_path / "tree")
    assert (tree / "addons" / "gateway.py").is_file() and (tree / "policies" / "openai.yaml").is_file()
    proxy = BaselineGateway("http://127.0.0.1:9", tree)
    assert proxy.command()[proxy.command().index("-s") + 1] == str(tree / "addons" / "gateway.py")
    assert proxy.env["PYTHONPATH"] == str(tree / "addons")


@pytest.mark.slow
def test_the_hook_probe_times_a_tree_in_a_child_process_as_in_process() -> None:
    args = parse_args(["--smoke", "--hook-iterations", "400", "--rounds", "2"])
    costs = baseline_hook_costs(args, ROOT)  # this tree against itself: the mechanics, not the figures
    assert [c.frame for c in costs] == list(BASELINE_FRAMES)
    for cost in costs:
        assert len(cost.current_us) == len(cost.baseline_us) == 2
        assert all(us > 0 for us in cost.current_us + cost.baseline_us)
    shutil.rmtree(args.output.parent)
