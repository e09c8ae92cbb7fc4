"""The monitoring files in deploy/: the Kubernetes scrape config keeps exactly the relay's pods
of deploy/k8s.yaml, and, where promtool is installed (Debian package ``prometheus``), the
Prometheus configs, the alert rules and every dashboard query parse. The metric names they use are
checked against a live scrape in tests/e2e/test_observability.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _meta(labels: dict[str, str], annotations: dict[str, str]) -> dict[str, str]:
    """A pod's discovery labels, as Prometheus' Kubernetes service discovery names them."""
    def clean(name: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    meta = {f"__meta_kubernetes_pod_label_{clean(k)}": v for k, v in labels.items()}
    meta |= {f"__meta_kubernetes_pod_annotation_{clean(k)}": v for k, v in annotations.items()}
    meta["__address__"] = "10.0.0.7:9999"
    return meta


def _relabel(meta: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """The keep and replace steps of relabel_configs (what the config uses); None: dropped."""
    labels = dict(meta)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace" and match is not None:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def test_kubernetes_scrape_config_keeps_every_relay_pod_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    scraped = {}
    for doc in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()):
        if not doc or doc.get("kind") != "Deployment":
            continue
        template = doc["spec"]["template"]["metadata"]
        labels = _relabel(_meta(template.get("labels", {}), template.get("annotations", {})),
                          job["relabel_configs"])
        if labels is not None:
            scraped[labels["job"]] = (labels["__address__"], labels["__metrics_path__"])
    assert scraped == {"relay-edge": ("10.0.0.7:8080", "/metrics"),
                       "relay-producer": ("10.0.0.7:8090", "/metrics")}
    # A pod without the annotation is left alone.
    assert _relabel(_meta({"app.kubernetes.io/name": "avatar-relay"}, {}),
                    job["relabel_configs"]) is None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_the_compose_config_and_every_dashboard_query(
        tmp_path: Path) -> None:
    def promtool(*args: str) -> None:
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    promtool("check", "rules", str(DEPLOY / "prometheus/relay-alerts.yml"))
    promtool("check", "config", str(DEPLOY / "prometheus/prometheus-compose.yml"))
    dashboard = json.loads((DEPLOY / "grafana/relay-dashboard.json").read_text())
    exprs = [t["expr"].replace("$__rate_interval", "5m")
             for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(path))
    assert len(exprs) > 30
