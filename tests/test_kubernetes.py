"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, every built-in object validates
against the Kubernetes schemas offline (kubernetes-validate), the custom resources carry the fields we
rely on, and the manifests agree with the service (probes, port, shutdown timing, metric names)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mnemo.service.metrics import ServiceMetrics
from mnemo.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/keda", "overlays/prometheus-operator", "overlays/gpu", "overlays/kserve"]
KUBERNETES = "1.30"
CUSTOM = {"ScaledObject", "ServiceMonitor", "InferenceService"}  # CRDs: no schema bundled offline
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (it renders the kustomize overlays)"
)


def render(overlay: str) -> dict[str, dict]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / overlay)], capture_output=True, text=True, check=True
    )
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out.stdout) if doc}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates(overlay):
    objects = render(overlay)
    assert objects
    for kind, doc in objects.items():
        if kind not in CUSTOM:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_deployment_matches_the_service():
    objects = render("base")
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == int(env["MNEMO_PORT"]) == Settings().port
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["MNEMO_SHUTDOWN_TIMEOUT_S"])
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's mnemo user
    assert any(m["mountPath"] == "/models" and m["readOnly"] for m in container["volumeMounts"])
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert (
        objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == objects["Deployment"]["metadata"]["name"]
    )


def test_the_custom_resources_carry_what_we_rely_on():
    metric_names = {m.name for m in ServiceMetrics().registry.collect()}
    keda = render("overlays/keda")
    assert "HorizontalPodAutoscaler" not in keda  # KEDA brings its own
    (trigger,) = keda["ScaledObject"]["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "mnemo_queue_depth" in trigger["metadata"]["query"]
    assert "mnemo_queue_depth" in metric_names
    assert keda["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == keda["Deployment"]["metadata"]["name"]
    monitor = render("overlays/prometheus-operator")
    service_labels = monitor["Service"]["metadata"]["labels"]
    selector = monitor["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service_labels.items()
    assert monitor["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    kserve = render("overlays/kserve")["InferenceService"]
    (container,) = kserve["spec"]["predictor"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"  # the V2 routes we serve
    assert container["ports"][0]["containerPort"] == 8000
    gpu = render("overlays/gpu")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["image"] == "mnemo:gpu" and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
