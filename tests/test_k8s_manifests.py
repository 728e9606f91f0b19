"""deploy/k8s/ and deploy/haproxy.cfg: valid Kubernetes objects and HAProxy configuration, wired
as docs/service.md ("Scaling out") says.

The objects are checked against the Kubernetes JSON schemas that the `kubernetes-validate`
package ships (strict: an unknown field is an error), with the network cut off, so the check
never downloads a schema. The HAProxy configurations must be what stream/replicas.py writes
and what `haproxy -c` accepts.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.replicas import haproxy_config
from tests.test_replicas import haproxy_check

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"  # schemas of the oldest Kubernetes still commonly run
MAX_PODS = 4  # haproxy.yaml routes diffstream-0 .. diffstream-3


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path.name, doc))
    return found


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [
        d
        for _, d in _documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(docs) == 1, f"{len(docs)} {kind} objects named {name}"
    return docs[0]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during an offline test: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_manifests_match_the_kubernetes_schemas_offline(offline: None) -> None:
    """Fails if a manifest has a misspelt or misplaced field or a wrong type (tried:
    `readinesProbe`, and terminationGracePeriodSeconds as the string "45"), or if the validator
    needs the network."""
    import kubernetes_validate

    docs = _documents()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Service", "Service", "StatefulSet"], kinds
    for filename, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{filename}: {doc['kind']} {doc['metadata']['name']}: {where}: {exc}")


def test_the_statefulset_drains_routes_and_asks_for_a_gpu() -> None:
    """Fails if the pods lose what the design needs: a GPU each, /healthz readiness, a liveness
    probe that a drain cannot fail, a grace period longer than the drain (tried: 20 s for a
    30 s drain), the pod's name as replica id, or a headless Service that keeps a draining
    pod's DNS name."""
    sts = _one("StatefulSet", "diffstream")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DIFFSTREAM_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    drain_s = float(env["DIFFSTREAM_DRAIN_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > drain_s + 5, "no time left after the drain"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # /healthz is 503 while draining; /livez only when the engine's worker is gone.
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    port = container["ports"][0]["containerPort"]
    assert "--port" in container["args"] and str(port) in container["args"]
    assert sts["spec"]["replicas"] <= MAX_PODS
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()

    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= labels.items()

    front = _one("Deployment", "diffstream-haproxy")
    public = _one("Service", "diffstream-api")
    assert (
        public["spec"]["selector"].items()
        <= front["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_haproxy_configs_are_the_generators_and_valid(tmp_path) -> None:
    """Fails if deploy/k8s/haproxy.yaml's or deploy/haproxy.cfg's configuration drifts from
    what `python -m stream.replicas` writes (tried: a hand-edited `balance leastconn`), or if
    HAProxy refuses it."""
    config = _one("ConfigMap", "diffstream-haproxy")["data"]["haproxy.cfg"]
    pods = [
        (f"diffstream-{i}", f"diffstream-{i}.diffstream.default.svc.cluster.local:8000")
        for i in range(MAX_PODS)
    ]
    assert config == haproxy_config(pods, bind=":8080", resolvers=True)
    checked = haproxy_check(config, tmp_path)  # names that do not resolve here: maintenance
    assert checked.returncode == 0, checked.stdout + checked.stderr

    example = (DEPLOY / "haproxy.cfg").read_text()
    replicas = [("r1", "10.0.0.1:8000"), ("r2", "10.0.0.2:8000")]
    assert example.endswith(haproxy_config(replicas, bind=":8080"))
    checked = haproxy_check(example, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
