"""scripts/bench keeps working: its smoke runs end to end (relay and capacity), and the parts its figures rest on.

No test here asserts a performance figure: the machines are shared and timings are noise.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from websockets.asyncio.client import connect

from ai_gateway.config.policy import DEFAULT_POLICY, load_policy
from ai_gateway_tools.bench import capacity, paired
from ai_gateway_tools.bench.__main__ import parse_args
from ai_gateway_tools.bench.configs import (
    CONFIGS,
    DEFAULT_CONFIGS,
    LITELLM,
    FloorRelay,
    GuardedGateway,
    Workdir,
    keep_compression_policy,
)
from ai_gateway_tools.bench.hooks import DEFAULTS, HOOK_DONE_US, hook_costs
from ai_gateway_tools.bench.litellm import CALLBACK_SOURCE, USAGE_LOG_ENV, Metered, Tally, read_log, write_config
from ai_gateway_tools.bench.measure import percentile, serpentine
from ai_gateway_tools.bench.portkey import PRELOAD_SOURCE, UPSTREAM_ENV
from ai_gateway_tools.bench.report import BEGIN, BENCHMARKS, END, Target, splice
from ai_gateway_tools.loadgen import LoadStats, Stop, Traffic, canonical_usage, drive, event_type, pcm16_bytes
from ai_gateway_tools.simulators.realtime import EXAMPLE_USAGE, SentUsage, SimulatorThread

from .bench_smoke import SMOKE_RUNS


def test_smoke_never_writes_benchmarks_md_by_default() -> None:
    args = parse_args(["--smoke"])
    assert args.output != BENCHMARKS
    assert args.output.parent.is_dir()
    shutil.rmtree(args.output.parent)
    assert args.rounds == 1 and args.soak_mb < 10
    assert parse_args(["--smoke", "--rounds", "2", "--output", "x.md"]).rounds == 2
    assert parse_args([]).output == BENCHMARKS


def test_unknown_configuration_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--configs", "gateway,nginx"])
    assert "nginx" in capsys.readouterr().err


def test_splice_keeps_the_hand_written_analysis() -> None:
    first = splice(None, "tables v1")
    assert first.startswith("# Benchmarks") and "tables v1" in first
    edited = first.replace("# Benchmarks\n", "# Benchmarks\n\nIntro.\n") + "\n## Findings\nKept.\n"
    second = splice(edited, "tables v2")
    assert "Intro." in second and "## Findings\nKept." in second
    assert "tables v2" in second and "tables v1" not in second
    assert second.count(BEGIN) == second.count(END) == 1


def test_keep_compression_policy_drops_only_the_extension_header(tmp_path: Path) -> None:
    default, kept = load_policy(DEFAULT_POLICY), load_policy(keep_compression_policy(tmp_path))
    realtime = "/v1/realtime"
    assert "sec-websocket-extensions" in default.match(realtime).request.remove
    assert "sec-websocket-extensions" not in kept.match(realtime).request.remove
    assert [(r.suffix, r.type) for r in kept.routes] == [(r.suffix, r.type) for r in default.routes]


def test_the_empty_addon_is_a_script_mitmproxy_can_load(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(Workdir.create(tmp_path).empty_addon.read_text(), namespace)
    (addon,) = namespace["addons"]  # type: ignore[misc]
    assert addon.websocket_message(None) is None  # type: ignore[attr-defined]


def test_serpentine_alternates_the_order_of_configurations() -> None:
    order = [(r, c.name) for r, c in serpentine(CONFIGS[:3], 2)]
    names = [c.name for c in CONFIGS[:3]]
    assert order == [(0, n) for n in names] + [(1, n) for n in reversed(names)]


def test_percentile_is_an_observed_value() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def test_targets_are_floors_or_ceilings() -> None:
    assert Target("ratio", 0.98, 0.97, at_least=True).met
    assert not Target("ratio", 0.96, 0.97, at_least=True).met
    assert Target("growth", 19.0, 20.0, " MB").met
    assert not Target("growth", 21.0, 20.0, " MB").met


def test_traffic_is_sized_as_realtime_audio() -> None:
    append = json.loads(Traffic(append_ms=100).append(random.Random(0)))
    assert pcm16_bytes(100) == 4800
    assert len(append["audio"]) == 6400
    assert json.loads(Traffic(audio_deltas=7).response_create())["response"]["metadata"] == {"sim_deltas": "7"}


def test_event_type_is_read_from_the_first_bytes() -> None:
    assert event_type('{"type": "response.done", "response": {}}') == "response.done"
    assert event_type(b'{"type":"response.output_audio.delta","delta":"AAAA"}') == "response.output_audio.delta"
    assert event_type('{"event_id": "e1", "type": "response.done"}') is None


def test_litellm_is_opt_in_so_the_smoke_run_never_installs_it() -> None:
    assert LITELLM not in DEFAULT_CONFIGS
    assert parse_args(["--configs", "mitmdump,litellm"]).configs == ["mitmdump", "litellm"]


def test_litellm_config_routes_every_model_to_the_simulator(tmp_path: Path) -> None:
    config = yaml.safe_load(write_config(tmp_path, "http://127.0.0.1:9", "sk-key").read_text())
    (route,) = config["model_list"]
    assert route["model_name"] == "*"
    assert route["litellm_params"]["model"] == "openai/*"
    assert route["litellm_params"]["api_base"] == "http://127.0.0.1:9"
    assert config["general_settings"]["master_key"] == "sk-key"
    module = config["litellm_settings"]["callbacks"].rsplit(".", 1)[0]
    assert (tmp_path / f"{module}.py").read_text() == CALLBACK_SOURCE


def test_litellm_callback_writes_what_tally_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback runs inside LiteLLM; here with a stand-in for its base class, on what LiteLLM hands
    it when a Realtime session closes: the session's stored events and its standard logging object."""
    for name in ("litellm", "litellm.integrations", "litellm.integrations.custom_logger"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["litellm.integrations.custom_logger"].CustomLogger = object  # type: ignore[attr-defined]
    monkeypatch.setenv(USAGE_LOG_ENV, str(tmp_path / "usage.jsonl"))
    namespace: dict[str, object] = {}
    exec(CALLBACK_SOURCE, namespace)
    events = [{"type": "session.created"}, {"type": "response.done"}, {"type": "response.done"}]
    details = {"usage_object": {"prompt_tokens_details": {"cached_tokens": 4}}}
    logged = {"model_group": "m", "prompt_tokens": 30, "completion_tokens": 7, "metadata": details}
    callback = namespace["usage_log"].async_log_success_event  # type: ignore[attr-defined]
    asyncio.run(callback({"standard_logging_object": logged}, events, None, None))
    (record,) = read_log(tmp_path / "usage.jsonl")
    assert record["model"] == "m"
    assert Tally.of_log([record]) == Tally(sessions=1, responses=2, input_tokens=30, output_tokens=7, cached_tokens=4)


def test_litellm_metering_is_compared_with_the_ledger() -> None:
    response = SentUsage("sess_1", "response", "m", "m-2025-08-28", "completed", EXAMPLE_USAGE)
    transcription = SentUsage("sess_1", "transcription", "m", "gpt-4o-transcribe", "completed", {"type": "duration"})
    sent = Tally.of_ledger([response, response, transcription])
    assert sent == Tally(sessions=1, responses=2, input_tokens=264, output_tokens=242, cached_tokens=128)
    assert (
        Metered(sent, sent).summary().endswith("2/2 responses in 1/1 sessions, input, output and cached tokens exact")
    )
    lost = Metered(Tally(), sent) + Metered(sent, sent)
    assert lost.summary().endswith(
        "2/4 responses in 1/2 sessions, input tokens 264/528, output tokens 242/484, cached tokens 128/256"
    )


# --- the capacity benchmark (scripts/bench --capacity) ------------------------------------------


def test_capacity_options() -> None:
    args = capacity.parse_args(["--smoke"])
    assert args.output != BENCHMARKS
    shutil.rmtree(args.output.parent)
    assert args.configs == ["direct", "serve", "mitmdump"]  # the baseline always runs
    assert capacity.parse_args(["--ramp", "50,25,50"]).ramp == [25, 50]
    assert capacity.parse_args([]).output == BENCHMARKS
    assert LITELLM.name not in capacity.parse_args([]).configs and "portkey" not in capacity.parse_args([]).configs
    for bad in (["--configs", "serve,nginx"], ["--ramp", "many"], ["--ramp", "0"]):
        with pytest.raises(SystemExit):
            capacity.parse_args(bad)


def test_capacity_search_ramps_retries_then_bisects() -> None:
    search = capacity.Search([25, 50, 100, 200], bisect=2, retries=1)
    tried = []
    outcome = {25: True, 50: True, 100: False, 75: True, 87: False}
    while (n := search.next()) is not None:
        tried.append(n)
        search.record(n, outcome[n])
    assert tried == [25, 50, 100, 100, 75, 87, 87]  # each miss is tried once more
    assert (search.met, search.missed) == (75, 87)


def step(config: str, sessions: int, p99_ms: float, baseline_ms: float = 1.0, problems: list[str] | None = None):
    stats = LoadStats(latencies=[p99_ms / 1000] * 10)
    return capacity.Step(config, sessions, stats, 1.0, 0.5, 0.2, problems or [], baseline_ms)


def test_capacity_is_the_largest_count_met_below_the_first_missed() -> None:
    steps = [
        step("serve", 25, 5),
        step("serve", 50, 30),  # missed: +29 ms
        step("serve", 50, 10),  # the retry met
        step("serve", 100, 10, problems=["3 frames lost"]),
        step("mitmdump", 25, 5),
        step("mitmdump", 50, 5),
    ]
    serve, mitmdump = capacity.capacities(steps, ["direct", "serve", "mitmdump"])
    assert (serve.sessions, serve.missed.sessions, serve.bounded) == (50, 100, False)  # type: ignore[union-attr]
    assert serve.missed.why_missed() == "3 frames lost"  # type: ignore[union-attr]
    assert (mitmdump.sessions, mitmdump.missed, mitmdump.cell()) == (50, None, "≥ 50")
    assert serve.projected == 75 and mitmdump.projected == 75  # 25 and 50 sessions at half a core (median)
    assert not step("x", 1, 22, baseline_ms=1).met and step("x", 1, 21, baseline_ms=1).met


def test_a_guarded_gateway_that_fails_to_start_leaves_no_guard_service_behind(tmp_path: Path) -> None:
    class Refused(GuardedGateway):
        def serve(self, url: str | None) -> None:
            raise ValueError(f"refused with {url}")

    gateway = Refused("http://127.0.0.1:9", tmp_path)
    with pytest.raises(ValueError, match="refused with http://127.0.0.1:"):
        gateway.start()
    assert gateway.service is not None and gateway.service.poll() is not None


@pytest.mark.parametrize("service", ["slow", "dead"])
def test_a_guarded_gateway_s_moderation_service_can_be_slow_or_dead(tmp_path: Path, service: str) -> None:
    """The gateway starts with the moderation guard's URL a simulator answering after 1 s (slow) or
    a port that refuses connections (dead)."""
    with GuardedGateway("http://127.0.0.1:9", tmp_path, service=service) as gateway:
        document = yaml.safe_load(Path(gateway.options["gateway_policy"]).read_text(encoding="utf-8"))
        (url,) = [g["url"] for g in document["guardrails"] if g["kind"] == "moderation"]
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        if service == "dead":
            assert gateway.service is None
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, int(port)), timeout=2).close()
        else:
            assert gateway.service is not None and gateway.service.args[-2:] == ["--delay", "1.0"]


def test_paired_ratio_is_the_first_configurations_cpu_per_frame_over_each_ones() -> None:
    rounds = [paired.Round([2.0, 2.5], [1000, 1000], 0.5), paired.Round([3.0, 3.0], [1000, 900], 0.6, ["x: reset"])]
    configs = [c for c in CONFIGS if c.name in ("serve", "serve-guarded")]
    assert rounds[0].ratio(1) == pytest.approx(0.8) and rounds[1].ratio(1) == pytest.approx(0.9)
    text = paired.report(configs, rounds)
    assert "| serve-guarded | 2500 3333 | 0.800 0.900 | **0.850** |" in text
    assert "round's end, a turn apart): 1000, 1000/900" in text  # each configuration's count where they differ
    assert "Sessions that ended early: x: reset" in text


def test_paired_runs_configurations_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Both relays carry the same sessions in the same round; each gets a ratio (not asserted: noise)."""
    argv = ["--configs", "serve,serve-guarded-regex", "--sessions", "2", "--seconds", "0.5", "--rounds", "1"]
    assert paired.main(argv) == 0
    out = capsys.readouterr().out
    assert "| serve | " in out and "| serve-guarded-regex | " in out
    assert "a turn apart): 0" not in out and "Sessions that ended early: none" in out
    with pytest.raises(SystemExit):
        paired.main(["--configs", "serve,direct"])  # direct relays nothing


def test_simulator_paces_deltas_and_the_client_times_each_from_when_it_was_due() -> None:
    interval, deltas = 0.05, 6
    paced = Traffic(appends=1, append_ms=20, append_interval=0.02, audio_deltas=deltas, delta_interval=interval)
    with SimulatorThread(transcript_deltas=0) as simulator:
        stats = asyncio.run(drive(simulator.url, "m", paced, Stop(turns=1), compression=None))
        lost = asyncio.run(drive("http://127.0.0.1:9", "m", paced, Stop(turns=1), keep_going=True))
    assert stats.server_frames == 1 + 3 + deltas and stats.sessions == 1 and len(stats.lateness) == 1
    # The last delta left (deltas - 1) intervals after the first; counted from when it was due, it is prompt.
    assert max(stats.latencies) < (deltas - 1) * interval
    assert lost.sessions == 0 and len(lost.failures) == 1


def test_simulator_refuses_a_bad_delta_interval() -> None:
    async def ask(url: str) -> dict[str, object]:
        async with connect(url.replace("http", "ws") + "/v1/realtime?model=m") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "response.create", "response": {"metadata": {"sim_delta_ms": "-5"}}}))
            return json.loads(await ws.recv())

    with SimulatorThread() as simulator:
        error = asyncio.run(ask(simulator.url))
    assert error["type"] == "error" and "sim_delta_ms" in error["error"]["message"]  # type: ignore[index]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_portkey_preload_sends_api_openai_com_to_the_simulator(tmp_path: Path) -> None:
    """What Portkey's `ws` client does for wss://api.openai.com, in plain Node: the preload answers
    with a TCP connection to the given address; any other host is left to TLS."""
    preload = tmp_path / "preload.cjs"
    preload.write_text(PRELOAD_SOURCE)
    with socket.create_server(("127.0.0.1", 0)) as server:
        script = (
            "const tls = require('tls');"
            "const s = tls.connect({host: 'api.openai.com', port: 443, servername: 'api.openai.com'});"
            "s.on('connect', () => { s.write('hello'); s.end(); });"
            "console.log(s.constructor.name, typeof s.getPeerCertificate);"
        )
        env = {
            **os.environ,
            "NODE_OPTIONS": f"--require {preload}",
            UPSTREAM_ENV: f"127.0.0.1:{server.getsockname()[1]}",
        }
        node = subprocess.Popen(
            ["node", "-e", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        server.settimeout(30)
        connection, _ = server.accept()
        with connection:
            assert connection.recv(5) == b"hello"
    out, err = node.communicate(timeout=30)
    assert node.returncode == 0, err
    assert out.split() == ["Socket", "undefined"]  # a plain socket, not a TLSSocket


def test_splice_adds_a_section_without_touching_the_others() -> None:
    relay = splice(None, "relay v1")
    with_capacity = splice(relay, "capacity v1", capacity.BEGIN, capacity.END)
    assert with_capacity.startswith(relay.rstrip()) and "capacity v1" in with_capacity
    again = splice(splice(with_capacity, "relay v2"), "capacity v2", capacity.BEGIN, capacity.END)
    assert "relay v2" in again and "capacity v2" in again and "v1" not in again


def test_hook_rows_time_the_default_access_log_and_the_observed_one() -> None:
    args = parse_args(["--smoke", "--hook-iterations", "200"])
    rows = {cost.frame: cost for cost in hook_costs(args)}
    shutil.rmtree(args.output.parent)
    assert rows["response.done"].target_us == HOOK_DONE_US
    assert {"response.done, access log off", "response.done, JSON access log and traces"} <= set(rows)
    assert DEFAULTS == {"gateway_access_log": "text"}  # the option's default: keep them in step


# --- what the spend controls cost (scripts/bench --limits) -----------------------------------------


def test_the_floor_relays_sessions_byte_for_byte() -> None:
    """The byte floor (issue #22) forwards what a client sends before its upstream leg is connected too."""
    with SimulatorThread(seed=5) as upstream, FloorRelay(upstream.url) as floor:
        stats = asyncio.run(
            drive(floor.url, "bench-floor", Traffic(appends=2, audio_deltas=3), Stop(turns=2), sessions=4)
        )
    assert len(stats.usages) == 8
    sent = [canonical_usage(e.usage) for e in upstream.usage_for("bench-floor") if e.kind == "response"]
    assert sorted(stats.usages) == sorted(sent)


def test_every_default_configuration_is_in_a_smoke_run() -> None:
    """A configuration added to the bench's defaults is smoke-tested: it belongs in bench_smoke.SMOKE_RUNS,
    and each run has its module."""
    assert {c.name for c in DEFAULT_CONFIGS} <= {name for configs in SMOKE_RUNS.values() for name in configs}
    for run in SMOKE_RUNS:
        assert (Path(__file__).parent / f"test_bench_smoke_{run}.py").is_file()
