"""The container image, compose.yaml and the Kubernetes manifests, validated offline; the
dashboard's queries against a running replica. The image built and the stack run for real
under Docker Compose: tests/test_system.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from gateway.settings import Settings
from tests.harness import (
    GatewayFactory,
    RawClient,
    RedisServer,
    async_wait_until,
    client,
    envelope,
    recv_json,
)

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
KUBECTL = str(BIN / "kubectl") if (BIN / "kubectl").exists() else shutil.which("kubectl")
OVERLAYS = ("dev", "prod")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


# compose.yaml


def test_compose_validates_against_the_compose_specification() -> None:
    result = run(
        str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_jsonschema_would_catch_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  gateway:\n    imagee: wsgateway:0.1.0\n")  # a typo
    result = run(
        str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)
    )
    assert result.returncode != 0


def test_compose_topology() -> None:
    services = compose()["services"]
    assert {
        "redis",
        "gateway",
        "lb",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
        "publisher",
    } <= services.keys()
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 3
    assert "ports" not in gateway  # only the load balancer is published
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]
    assert services["lb"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    env = gateway["environment"]
    assert env["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    grace = float(gateway["stop_grace_period"].rstrip("s"))
    assert grace > float(env["GATEWAY_DRAIN_SECONDS"]) + float(env["GATEWAY_CLOSE_TIMEOUT"])
    assert float(env["GATEWAY_SHUTDOWN_TIMEOUT"]) < grace
    # ${WSGATEWAY_NOFILE:-65536}: an engine that cannot grant it is told a lower number.
    assert gateway["ulimits"]["nofile"]["soft"] == "${WSGATEWAY_NOFILE:-65536}"
    assert gateway["read_only"] is True
    Settings.model_validate(
        {k[len("GATEWAY_") :].lower(): v for k, v in env.items() if k.startswith("GATEWAY_")}
    )
    for name, service in services.items():
        # Every image can be pointed elsewhere (a mirror, the stand-ins); its default is pinned.
        overridable = re.fullmatch(r"\$\{WSGATEWAY_\w*IMAGE:-([^}]+)\}", service.get("image", ""))
        assert overridable, (name, service.get("image"))
        default = overridable.group(1)
        assert ":" in default and not default.endswith(":latest"), name
    mounts = " ".join(services["lb"]["volumes"])
    for conf in ("nginx.conf", "listen.conf", "upstreams.conf"):
        assert f"deploy/compose/nginx/{conf}" in mounts
        assert (ROOT / "deploy" / "compose" / "nginx" / conf).exists()


def test_load_balancer_config() -> None:
    conf = (ROOT / "deploy" / "compose" / "nginx" / "nginx.conf").read_text()
    assert "least_conn;" in conf
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1))  # type: ignore[union-attr]
    assert (
        read_timeout
        > Settings.model_fields["ping_interval"].default
        + Settings.model_fields["ping_timeout"].default
    )


def dashboard_series() -> set[str]:
    """Every series name the Grafana dashboard and the HPA query."""
    import json

    dashboard = json.loads((ROOT / "deploy/compose/grafana/dashboards/wsgateway.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in (
        "Connections open",
        "Deliveries per second",
        "Delivery latency",
        "Queue depth",
        "Closes by code",
        "Backplane",
    ):
        assert wanted in titles
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions.append((ROOT / "deploy/k8s/base/hpa.yaml").read_text())
    return {n for e in expressions for n in re.findall(r"wsgateway_[a-z_]+", e)}


async def test_dashboard_queries_name_series_a_running_gateway_exports(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """The names are read from a live replica's /metrics after the events that create them
    (a delivery, a drop, a close, a refusal, a malformed envelope), not from the docs."""
    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_MAX_CONNECTIONS": "3",
            "GATEWAY_SLOW_CONSUMER_POLICY": "drop-newest",
            "GATEWAY_QUEUE_MAX_MESSAGES": "2",
            "GATEWAY_SEND_BUFFER": "4096",
            "GATEWAY_WRITE_LIMIT": "4096",
        }
    )
    stalled = RawClient(gateway.ws_url + "?channels=feed", rcvbuf=4096)
    try:
        async with client(gateway.ws_url + "?channels=feed") as ws:
            assert (await recv_json(ws))["op"] == "subscribed"
            # 320 KB, one message at a time for the healthy client (its queue holds two): more
            # than the stalled client's buffers and queue.
            for n in range(40):
                redis_server.publish("ws:feed", envelope("feed", {"n": n, "pad": "x" * 8000}))
                assert (await recv_json(ws))["data"]["n"] == n
            redis_server.publish("ws:feed", b"not json")
            async with client(gateway.ws_url):
                with pytest.raises(InvalidStatus):  # the fourth: refused
                    async with client(gateway.ws_url):
                        pass
        # The two clients closed (the refused one never opened), the stalled one's drops,
        # and the loop lag's first sample (every 100 ms from the start).
        await async_wait_until(
            lambda: (
                gateway.metric("wsgateway_connections_closed_total") >= 2
                and gateway.metric("wsgateway_deliveries_dropped_total") > 0
                and gateway.metric("wsgateway_loop_lag_seconds_count") > 0
            )
        )
    finally:
        stalled.close()
    status, text = gateway.http("/metrics")
    assert status == 200
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    missing = dashboard_series() - exported
    assert not missing, sorted(exported)


# The image


def test_dockerfile() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2  # multi-stage
    assert "-slim" in dockerfile
    assert "requirements.lock" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["wsgateway"\]', dockerfile, re.M)  # exec form
    assert "PYTHONDONTWRITEBYTECODE=1" in dockerfile and "PYTHONUNBUFFERED=1" in dockerfile
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.*)$", dockerfile, re.M | re.S)
    assert healthcheck and "/readyz" in healthcheck.group(1) and "curl" not in healthcheck.group(1)
    ignore = (ROOT / ".dockerignore").read_text()
    assert ignore.splitlines()[1:2] == ["*"] or "*\n" in ignore


# Kubernetes


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None, "kubectl is not installed (requirements-test.lock has it)"
    result = run(KUBECTL, "kustomize", f"deploy/k8s/overlays/{overlay}")
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_kubernetes_schemas(
    overlay: str, tmp_path: Path
) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(render(overlay)))
    result = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_would_catch_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  prots: []\n")
    assert run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(bad)).returncode != 0


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_invariants(overlay: str) -> None:
    kinds = by_kind(render(overlay))
    for kind in (
        "Deployment",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "NetworkPolicy",
        "Namespace",
    ):
        assert kind in kinds, kind
    [gateway] = [d for d in kinds["Deployment"] if d["metadata"]["name"] == "wsgateway"]
    spec = gateway["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = next(c for c in kinds["ConfigMap"] if c["metadata"]["name"] == "wsgateway")["data"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config["GATEWAY_DRAIN_SECONDS"]) + float(config["GATEWAY_CLOSE_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 2
    assert (
        float(config["GATEWAY_SHUTDOWN_TIMEOUT"]) + pre_stop < pod["terminationGracePeriodSeconds"]
    )
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    # The restricted Pod Security profile.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"redis-url", "jwt-secret"}
    for deployment in kinds["Deployment"]:
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
    [hpa] = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    annotations = kinds["Ingress"][0]["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    # A draining replica's 503 sends the handshake to another one (as nginx does in compose).
    assert "http_503" in annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
    namespace = kinds["Namespace"][0]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    redis_here = any(d["metadata"]["name"] == "redis" for d in kinds["Deployment"])
    assert redis_here == (overlay == "dev")  # prod points at an external Redis
    assert ("Secret" in kinds) == (overlay == "dev")  # prod's Secret is managed outside


def test_gateway_api_component_routes_to_the_service(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    k8s = ROOT / "deploy" / "k8s"
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(k8s / 'base', overlay)}]\n"
        f"components: [{os.path.relpath(k8s / 'components' / 'gateway-api', overlay)}]\n"
    )
    assert KUBECTL is not None
    result = run(KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay))
    assert result.returncode == 0, result.stderr
    kinds = by_kind([d for d in yaml.safe_load_all(result.stdout) if d])
    [route] = kinds["HTTPRoute"]
    [service] = kinds["Service"]
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] in {p["port"] for p in service["spec"]["ports"]}
