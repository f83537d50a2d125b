"""The Helm chart (helm/kiln) checked by the real tools: `helm lint --strict`, `helm template`
with default and non-default values, the rendered manifests through `kubernetes-validate
--strict` (oldest and newest supported Kubernetes), `promtool check rules` on the shipped
PrometheusRule, and values.schema.json rejecting bad values.

Tools come from .ci/install-ops-tools.sh; a missing tool fails (never skips) the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops_tools import tool
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kiln"
RELEASE, NAMESPACE = "kiln", "kiln-test"
# kubeVersion in Chart.yaml is >=1.25; kubernetes-validate ships schemas up to 1.37.
KUBE_VERSIONS = ["1.25.0", "1.37.0"]
# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs; they are checked below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

VALUES = {
    "default": None,
    "full": CHART / "ci" / "full-values.yaml",
    "initcontainer": CHART / "ci" / "initcontainer-values.yaml",
    "existing-configmap": CHART / "ci" / "existing-configmap-values.yaml",
    "poll": CHART / "ci" / "poll-values.yaml",
}




def run(*cmd: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def values_args(name: str) -> list[str]:
    return ["-f", str(VALUES[name])] if VALUES[name] else []


def template(name: str, *extra: str, kube_version: str = KUBE_VERSIONS[-1], ok: bool = True):
    return run(tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
               "--kube-version", kube_version, *values_args(name), *extra, ok=ok)


def docs(rendered: str) -> dict[tuple[str, str], dict]:
    out = {}
    for doc in yaml.safe_load_all(rendered):
        if doc:
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def by_kind(objs: dict, kind: str) -> list[dict]:
    return [o for (k, _), o in objs.items() if k == kind]


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    return {name: docs(template(name).stdout) for name in VALUES}


@pytest.mark.parametrize("values", list(VALUES))
def test_helm_lint_strict(values):
    proc = run(tool("helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(values))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", list(VALUES))
def test_rendered_manifests_pass_kubernetes_validate_strict(values, kube_version, tmp_path):
    manifest = tmp_path / f"{values}.yaml"
    manifest.write_text(template(values, kube_version=kube_version).stdout)
    objs = docs(manifest.read_text())
    proc = run(tool("kubernetes-validate"), "--strict", "-k", kube_version, str(manifest), ok=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    passed = set(re.findall(r"passed for resource (\S+?)/(\S+) against", out))
    for kind, name in objs:
        if kind in CRD_KINDS:
            assert re.search(rf"Couldn't find schema for kind {kind} ", out), out
        else:
            assert (kind.lower(), name) in passed, f"{kind}/{name} not validated:\n{out}"
    unexpected = [line for line in out.splitlines()
                  if line.startswith(("WARN", "ERROR")) and not any(f"kind {k} " in line for k in CRD_KINDS)]
    assert not unexpected, "\n".join(unexpected)


def deployment(objs: dict) -> dict:
    (dep,) = by_kind(objs, "Deployment")
    return dep


def container(objs: dict) -> dict:
    (c,) = [c for c in deployment(objs)["spec"]["template"]["spec"]["containers"] if c["name"] == "kiln"]
    return c


def test_default_deployment_probes_security_and_volumes(rendered):
    objs = rendered["default"]
    dep = deployment(objs)
    pod = dep["spec"]["template"]["spec"]
    c = container(objs)
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = c["startupProbe"]
    # Sized for compile time: at least 10 minutes before liveness may kill a compiling pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # Non-root, read-only root filesystem, nothing extra.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Writable: compile cache and /tmp; the model repository read-only.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/models"].get("readOnly") is True
    assert not mounts["/var/cache/kiln"].get("readOnly") and "emptyDir" in volumes[mounts["/var/cache/kiln"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "kiln-models", "readOnly": True}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KILN_MODEL_REPO"] == "/models" and env["KILN_CACHE_DIR"] == "/var/cache/kiln"
    assert env["KILN_HTTP_HOST"] == "0.0.0.0" and env["KILN_HTTP_PORT"] == "8000"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"},
                          {"name": "grpc", "containerPort": 8001, "protocol": "TCP"}]
    assert env["KILN_GRPC_PORT"] == "8001"
    # Graceful termination: the preStop sleep fits in the grace period with time left to drain.
    # SIGTERM after the preStop sleep; the server drains for KILN_SHUTDOWN_GRACE_S, which ends
    # before the kubelet's SIGKILL.
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env["KILN_SHUTDOWN_GRACE_S"])
    assert 0 < sleep and drain >= 20
    assert sleep + drain < pod["terminationGracePeriodSeconds"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The HPA owns the replica count; a PDB keeps one pod through voluntary disruptions.
    assert "replicas" not in dep["spec"]
    (hpa,) = by_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert c["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (svc,) = by_kind(objs, "Service")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert {k for k, _ in objs} == {"Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler",
                                     "PodDisruptionBudget"}


def test_full_values_adapter_hpa_servicemonitor_rules_dashboard(rendered, tmp_path):
    objs = rendered["full"]
    dep = deployment(objs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    # Models from the chart-created ConfigMap: every key mounted at its repository path.
    cm = objs[("ConfigMap", "kiln-full-models")]
    items = {i["key"]: i["path"] for i in next(v for v in dep["spec"]["template"]["spec"]["volumes"]
                                               if v["name"] == "models")["configMap"]["items"]}
    assert items == {"digits-cnn__config.yaml": "digits-cnn/config.yaml",
                     "digits-cnn__1__model.onnx": "digits-cnn/1/model.onnx"}
    assert set(cm["data"]) | set(cm["binaryData"]) == set(items)
    assert "checksum/models" in dep["spec"]["template"]["metadata"]["annotations"]
    # Compile cache on a chart-created PVC that survives uninstall.
    pvc = objs[("PersistentVolumeClaim", "kiln-full-cache")]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # HPA: CPU + the two custom metrics, named exactly as the prometheus-adapter rules expose them.
    (hpa,) = by_kind(objs, "HorizontalPodAutoscaler")
    pods_metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    adapter_cm = objs[("ConfigMap", "kiln-full-prometheus-adapter")]
    assert adapter_cm["metadata"]["namespace"] == "monitoring"
    adapter = yaml.safe_load(adapter_cm["data"]["config.yaml"])
    exposed = {r["name"]["as"] for r in adapter["rules"]}
    assert set(pods_metrics) <= exposed, (pods_metrics, exposed)
    assert pods_metrics == {"kiln_inflight_requests_avg1m": {"type": "AverageValue", "averageValue": "16"},
                            "kiln_queue_time_p95_seconds": {"type": "AverageValue", "averageValue": "20m"}}
    for rule in adapter["rules"]:  # rates and histograms, never a raw counter
        q = rule["metricsQuery"]
        assert "<<.Series>>" in q and "<<.LabelMatchers>>" in q and "<<.GroupBy>>" in q
        if rule["seriesQuery"].startswith(("kiln_inference_requests_total", "kiln_request_duration_seconds_bucket")):
            assert "rate(" in q, q
    # ServiceMonitor scrapes the Service's named port at the metrics path.
    (sm,) = by_kind(objs, "ServiceMonitor")
    (svc,) = by_kind(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    # PrometheusRule = dashboards/prometheus-rules.yaml, and promtool accepts it.
    (pr,) = by_kind(objs, "PrometheusRule")
    assert pr["spec"] == yaml.safe_load((ROOT / "dashboards" / "prometheus-rules.yaml").read_text())
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(pr["spec"]))
    run(tool("promtool"), "check", "rules", str(rules_file))
    # Grafana sidecar ConfigMap = dashboards/kiln.json.
    dash = objs[("ConfigMap", "kiln-full-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["kiln.json"]) == json.loads((ROOT / "dashboards" / "kiln.json").read_text())
    assert pod_labels["team"] == "ml-platform"
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": "50%", "selector": pdb["spec"]["selector"]}


def test_initcontainer_values(rendered):
    objs = rendered["initcontainer"]
    dep = deployment(objs)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "registry.example.com/tools/fetch:1.2"
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["models"]
    assert volumes["compile-cache"]["persistentVolumeClaim"]["claimName"] == "kiln-cache-shared"
    assert dep["spec"]["replicas"] == 3
    assert "lifecycle" not in container(objs)
    assert pod["serviceAccountName"] == "inference"
    assert {k for k, _ in objs} == {"Deployment", "Service"}


def test_existing_configmap_values(rendered):
    objs = rendered["existing-configmap"]
    pod = deployment(objs)["spec"]["template"]["spec"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")["configMap"]
    assert models["name"] == "kiln-models" and len(models["items"]) == 2
    assert ("ConfigMap", "kiln-models") not in objs  # existing: not created by the chart
    (hpa,) = by_kind(objs, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]


def test_model_control_modes(rendered):
    """explicit by default (a changed models ConfigMap restarts the pods); poll: pods keep running and
    rescan their files, so the ConfigMap's checksum is not in the pod template."""
    env = {e["name"]: e.get("value") for e in container(rendered["default"])["env"]}
    assert env["KILN_MODEL_CONTROL_MODE"] == "explicit" and float(env["KILN_REPOSITORY_POLL_SECS"]) > 0
    assert "checksum/models" in deployment(rendered["full"])["spec"]["template"]["metadata"]["annotations"]
    objs = rendered["poll"]
    env = {e["name"]: e.get("value") for e in container(objs)["env"]}
    assert env["KILN_MODEL_CONTROL_MODE"] == "poll" and env["KILN_REPOSITORY_POLL_SECS"] == "10"
    assert "checksum/models" not in (deployment(objs)["spec"]["template"]["metadata"].get("annotations") or {})
    items = next(v for v in deployment(objs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert {i["path"] for i in items["configMap"]["items"]} >= {"digits-cnn/1/model.onnx", "digits-cnn/2/model.onnx"}
    # The config the chart ships parses as Kiln's own model config, rollout included.
    from service.config import parse_config

    cm = objs[("ConfigMap", "kiln-models")]
    key = next(k for k in cm["data"] if k.endswith("config.yaml"))
    cfg = parse_config(yaml.safe_load(cm["data"][key]), Path(key))
    assert cfg.rollout.canary.weight == 0.1


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "replicas=3"], "Additional property replicas is not allowed"),
    (["--set", "modelRepository.source=nfs"], "modelRepository.source"),
    (["--set", "modelRepository.source=initContainer"], "command"),
    (["--set", "compileCache.type=hostPath"], "compileCache.type"),
    (["--set", "autoscaling.targetCPUUtilizationPercentage=0"], "at least one metric"),
    (["--set", "modelRepository.source=configMap"], "files/binaryFiles"),
    (["--set", "probes.startup.failureThreshold=0"], "failureThreshold"),
    (["--set", "termination.terminationGracePeriodSeconds=12"], "time to drain"),
    (["--set", "probes.type=tcp"], "probes.type"),
    (["--set", "probes.type=grpc", "--set", "server.grpcPort=0"], "probes.type grpc needs server.grpcPort"),
    (["--set", "modelControl.mode=watch"], "modelControl.mode"),
])
def test_bad_values_are_rejected(args, message):
    proc = template("default", *args, ok=False)
    assert proc.returncode != 0, proc.stdout[:2000]
    assert message in proc.stderr, proc.stderr


def test_grpc_port_service_and_grpc_probes(tmp_path):
    objs = docs(template("default", "--set", "probes.type=grpc").stdout)
    c = container(objs)
    assert c["livenessProbe"]["grpc"] == {"port": 8001, "service": "live"}
    assert c["readinessProbe"]["grpc"] == {"port": 8001, "service": "ready"}
    assert c["startupProbe"]["grpc"] == {"port": 8001, "service": "ready"}
    assert "httpGet" not in c["livenessProbe"]
    (svc,) = by_kind(objs, "Service")
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port == {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP",
                         "appProtocol": "kubernetes.io/h2c"}
    out = tmp_path / "grpc.yaml"
    out.write_text(template("default", "--set", "probes.type=grpc").stdout)
    proc = run(tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSIONS[0], str(out))
    assert "passed for resource deployment/kiln" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    off = docs(template("default", "--set", "server.grpcPort=0").stdout)
    assert [p["name"] for p in container(off)["ports"]] == ["http"]
    assert [p["name"] for p in by_kind(off, "Service")[0]["spec"]["ports"]] == ["http"]
    assert {e["name"]: e.get("value") for e in container(off)["env"]}["KILN_GRPC_PORT"] == "0"


def test_helm_package_inlines_dashboard_and_rules(tmp_path):
    run(tool("helm"), "package", str(CHART), "-d", str(tmp_path))
    (pkg,) = tmp_path.glob("kiln-*.tgz")
    import tarfile

    with tarfile.open(pkg) as tar:
        names = set(tar.getnames())
        assert {"kiln/files/kiln.json", "kiln/files/prometheus-rules.yaml", "kiln/values.schema.json"} <= names
        assert not any(n.startswith("kiln/ci/") for n in names)
        member = tar.extractfile("kiln/files/prometheus-rules.yaml")
        assert member.read() == (ROOT / "dashboards" / "prometheus-rules.yaml").read_bytes()


def test_real_model_repository_through_a_configmap(tmp_path):
    """model_repo/ -> deploy/models_to_values.py -> chart ConfigMap -> files at their paths, byte for byte."""
    import base64

    # The two default models (the repository may grow past a ConfigMap's 1 MiB; these two will not).
    repo = tmp_path / "model_repo"
    for model in ("digits-cnn", "digits-cnn-openvino"):
        shutil.copytree(ROOT / "model_repo" / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
    values = tmp_path / "models-values.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "models_to_values.py"), str(repo)],
                          capture_output=True, text=True, timeout=60, check=True)
    values.write_text(proc.stdout)
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(run(tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                            "-f", str(values)).stdout)
    run(tool("kubernetes-validate"), "--strict", str(manifest))
    objs = docs(manifest.read_text())
    cm = objs[("ConfigMap", "kiln-models")]
    pod = deployment(objs)["spec"]["template"]["spec"]
    items = next(v for v in pod["volumes"] if v["name"] == "models")["configMap"]["items"]
    mounted = {}
    for item in items:
        key = item["key"]
        mounted[item["path"]] = (cm.get("data", {})[key].encode() if key in cm.get("data", {})
                                 else base64.b64decode(cm["binaryData"][key]))
    expected = {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert mounted == expected
    assert any(p.endswith("model.onnx") for p in mounted) and "digits-cnn/config.yaml" in mounted


@pytest.mark.parametrize("values", list(VALUES))
def test_notes_render(values, tmp_path):
    """NOTES.txt renders for every values file (helm only renders it on install: render it via tpl)."""
    chart = tmp_path / "kiln"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "files" / "NOTES.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | quote }}\n')
    out = run(tool("helm"), "template", RELEASE, str(chart), "--namespace", NAMESPACE,
              "--show-only", "templates/zz-notes.yaml", *values_args(values)).stdout
    notes = yaml.safe_load(out)["data"]["notes"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/" in notes and "/v2/health/ready" in notes
    assert "startup budget" in notes and "<no value>" not in notes, notes
