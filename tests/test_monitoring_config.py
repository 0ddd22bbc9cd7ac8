"""The monitoring configuration agrees with what the service really exports, and the deployment files with
the service's settings. No Docker here: docker/ci-test.sh runs the images and Prometheus for real.

Why: PromQL on a misspelt metric or label is not an error, just an empty panel or an alert that never
fires; a misspelt ``MNEMO_*`` variable is silently ignored (the settings ignore unknown variables).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mnemo.service.settings import Settings
from tests.image_bytes import png_bytes
from tests.service_helpers import make_settings, running_server

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker/grafana/dashboards/mnemo.json"
ALERTS = ROOT / "docker/prometheus/alerts.yml"
SCRAPE = ROOT / "docker/prometheus/prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
GRAFANA = ROOT / "docker/grafana/provisioning"
PROMETHEUS_BUILTINS = {"up"}  # series Prometheus itself writes for every target
SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(panel: dict) -> list[str]:
    return [target["expr"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def all_exprs() -> list[str]:
    return [e for p in dashboard()["panels"] for e in panel_exprs(p)] + [r["expr"] for r in alert_rules()]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name → label names, scraped from a real server on the shipped bundle after one scoring."""
    image = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    with running_server(make_settings(ROOT / "bundles/brick")) as url:
        answer = httpx.post(f"{url}/v1/models/brick:score", content=image,
                            headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
        assert answer.status_code == 200, answer.text
        text = httpx.get(f"{url}/metrics", timeout=10).text
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


# --------------------------------------------------------------------------------- metric names and labels


def test_every_queried_metric_is_exported(exported):
    for expr in all_exprs():
        used = set(re.findall(r"\bmnemo_\w+", expr))
        assert used or "up{" in expr, f"query uses no metric at all: {expr}"
        missing = used - exported.keys()
        assert not missing, f"{sorted(missing)} in {expr!r} are not exported (have {sorted(exported)})"


def test_histogram_queries_use_the_exported_suffixes(exported):
    """``histogram_quantile`` needs ``_bucket`` series of a real histogram (with an ``le`` label)."""
    quantiles = [e for e in all_exprs() if "histogram_quantile" in e]
    assert quantiles
    for expr in quantiles:
        buckets = re.findall(r"\b(mnemo_\w+_bucket)\b", expr)
        assert buckets, f"histogram_quantile over no _bucket series: {expr}"
        assert all("le" in exported[name] for name in buckets), expr


def test_label_matchers_name_real_labels(exported):
    for expr in all_exprs():
        for name, matchers in SELECTOR.findall(expr):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            known = {"job", "instance"} if name in PROMETHEUS_BUILTINS else exported.get(name, set())
            assert labels <= known, f"{name} has no label(s) {sorted(labels - known)} in {expr!r}"


def test_grouping_labels_exist(exported):
    """``sum by (model, verdict)`` on a series without ``verdict`` would silently merge the verdicts."""
    for expr in all_exprs():
        names = set(re.findall(r"\bmnemo_\w+", expr))
        available = set.union(*(exported.get(n, set()) for n in names)) if names else {"job", "instance"}
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= available, f"grouping by {sorted(labels - available)} in {expr!r}"


# ------------------------------------------------------------------------------ what the issue asks for


def panels_using(metric: str, kind: str | None = None) -> list[dict]:
    return [
        p
        for p in dashboard()["panels"]
        if any(metric in e for e in panel_exprs(p)) and (kind is None or p["type"] == kind)
    ]


def test_dashboard_has_the_listed_panels():
    assert panels_using("rate(mnemo_requests_total", "timeseries"), "requests/s"
    latency = panels_using("mnemo_request_duration_seconds_bucket", "timeseries")
    quantiles = {q for p in latency for e in panel_exprs(p) for q in re.findall(r"quantile\((0\.\d+)", e)}
    assert {"0.5", "0.95", "0.99"} <= quantiles, "latency p50/p95/p99"
    assert panels_using("mnemo_batch_size"), "batch sizes"
    assert panels_using("mnemo_queue_depth"), "queue depth"
    verdicts = panels_using("mnemo_verdicts_total", "timeseries")
    assert any("model" in e and "verdict" in e for p in verdicts for e in panel_exprs(p)), "verdicts/model"
    drift = panels_using("mnemo_anomaly_score_bucket", "heatmap")
    assert drift and all(t.get("format") == "heatmap" for p in drift for t in p["targets"]), "score drift"


def test_dashboard_uses_the_provisioned_datasource_and_panels_do_not_overlap():
    sources = yaml.safe_load((GRAFANA / "datasources/prometheus.yml").read_text())["datasources"]
    uids = {s["uid"] for s in sources}
    board = dashboard()
    used = {p["datasource"]["uid"] for p in board["panels"]}
    used |= {v["datasource"]["uid"] for v in board["templating"]["list"]}
    assert used <= uids
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not cells & cell, f"panel {p['title']!r} overlaps or overflows"
        cells |= cell
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_alerts_cover_anomaly_rate_latency_and_scrape_down():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert any('verdict="anomalous"' in e for e in exprs.values()), "high anomaly rate"
    assert any("histogram_quantile(0.99" in e and "request_duration" in e for e in exprs.values()), "p99"
    assert any(re.search(r'up\{job="mnemo"\}\s*==\s*0', e) for e in exprs.values()), "scrape down"
    assert all(rule.get("for") and rule["annotations"].get("summary") for rule in alert_rules())


# -------------------------------------------------------------------------------- compose and Dockerfile


def test_compose_publishes_only_on_loopback():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"


def test_monitoring_sits_behind_a_profile_and_mounts_the_repo_config():
    services = compose()["services"]
    assert "profiles" not in services["mnemo"], "the service alone must start without a profile"
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    mounts = {m.split(":")[0]: m.split(":")[1] for s in services.values() for m in s.get("volumes", [])}
    assert mounts["./docker/prometheus"] == "/etc/prometheus"
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "dashboards/mnemo.yml").read_text())["providers"][0]
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]


def test_scrape_config_targets_the_compose_service():
    config = yaml.safe_load(SCRAPE.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mnemo"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose()["services"]
    assert any(str(p).endswith(f":{port}") for p in compose()["services"][host]["ports"])
    assert all((SCRAPE.parent / f).is_file() for f in config["rule_files"])


def dockerfile_env() -> dict[str, str]:
    """Every ``NAME=value`` set by the Dockerfile's ENV instructions (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    pairs = [p for line in text.splitlines() if line.startswith("ENV ") for p in line[4:].split()]
    return dict(pair.split("=", 1) for pair in pairs)


def test_image_and_compose_settings_are_real_settings():
    fields = {f"MNEMO_{name.upper()}" for name in Settings.model_fields}
    used = {k for k in dockerfile_env() if k.startswith("MNEMO_")}
    used |= set(compose()["services"]["mnemo"]["environment"])
    assert used and used <= fields, f"unknown settings: {sorted(used - fields)}"
    env = dockerfile_env()
    assert env["MNEMO_HOST"] == "0.0.0.0" and env["MNEMO_MODEL_DIR"] == "/models"
    assert f"EXPOSE {env['MNEMO_PORT']}" in DOCKERFILE.read_text()
