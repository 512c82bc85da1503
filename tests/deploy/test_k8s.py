"""deploy/k8s without a cluster: every rendered manifest (base and overlays) against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and KEDA's CRD schemas
(vendored in deploy/schemas/keda-crds.json), the references between them, and the autoscaling
queries."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import ValidationError as K8sValidationError

from tests.deploy.kustomize_lite import apply_op, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEDA = json.loads((ROOT / "deploy" / "schemas" / "keda-crds.json").read_text())
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (sleep preStop hooks: 1.30)
OVERLAYS = ["base", "overlays/production", "overlays/cpu"]
# Metadata each KEDA scaler requires (KEDA's pkg/scalers/*_scaler.go), and the numeric ones.
SCALER_KEYS = {
    "prometheus": ({"serverAddress", "query", "threshold"}, {"threshold", "activationThreshold"}),
    "redis": ({"listName"}, {"listLength", "activationListLength"}),
}


def _closed(schema: Any) -> Any:
    """The CRD schema with objects closed: the API server prunes unknown fields silently, so a
    misspelt field would be lost without a word; here it fails."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


KEDA_SCHEMAS = {kind: _closed(s) for kind, s in KEDA["kinds"].items()}


def validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        schema = KEDA_SCHEMAS[f"{doc['apiVersion']}/{doc['kind']}"]
        jsonschema.validate(doc, schema)
        for trig in doc.get("spec", {}).get("triggers", []):
            required, numeric = SCALER_KEYS[trig["type"]]
            meta = trig["metadata"]
            assert required <= meta.keys(), (doc["metadata"]["name"], required - meta.keys())
            for k in numeric & meta.keys():
                float(meta[k])
            if trig["type"] == "redis":
                assert "address" in meta or {"host", "port"} <= meta.keys()
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S / request.param)


def _by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_manifest_validates(docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "Secret",
        "NetworkPolicy",
    } <= kinds
    for d in docs:
        validate(d)


def test_a_misspelt_field_fails() -> None:
    docs = render(K8S / "base")
    dep = copy.deepcopy(_by(docs, "Deployment")["tunegate-gateway"])
    apply_op(
        dep,
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/readinesProbe",
            "value": {"httpGet": {"path": "/ready", "port": 8000}, "periodSecond": 5},
        },
    )
    with pytest.raises(K8sValidationError):
        validate(dep)
    so = copy.deepcopy(_by(docs, "ScaledObject")["tunegate-trainer"])
    so["spec"]["minReplicas"] = 0  # KEDA spells it minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate(so)
    so = copy.deepcopy(_by(docs, "ScaledObject")["tunegate-engine"])
    del so["spec"]["triggers"][0]["metadata"]["query"]
    with pytest.raises(AssertionError):
        validate(so)


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def test_references_resolve(docs: list[dict[str, Any]]) -> None:
    secrets = {
        n: set(d.get("stringData", {})) | set(d.get("data", {}))
        for n, d in _by(docs, "Secret").items()
    }
    configs = _by(docs, "ConfigMap")
    claims = _by(docs, "PersistentVolumeClaim")
    pods = _pod_specs(docs)
    for name, tpl in pods.items():
        spec = tpl["spec"]
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets, name
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configs, name
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (name, ref)
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            vols = {v["name"] for v in spec.get("volumes", [])}
            vols |= {
                t["metadata"]["name"]
                for t in next(
                    d
                    for d in docs
                    if d["metadata"]["name"] == name and d["kind"] in ("Deployment", "StatefulSet")
                )["spec"].get("volumeClaimTemplates", [])
            }
            assert mounts <= vols, (name, mounts - vols)
            # $(VAR) in args is expanded by the kubelet only for variables the container has.
            names = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []):
                if "$(" in arg:
                    assert arg.split("$(")[1].split(")")[0] in names, (name, arg)
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, name
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, name
    auths = _by(docs, "TriggerAuthentication")
    for n, so in _by(docs, "ScaledObject").items():
        assert so["spec"]["scaleTargetRef"]["name"] in pods, n
        for trig in so["spec"]["triggers"]:
            if "authenticationRef" in trig:
                auth = auths[trig["authenticationRef"]["name"]]
                for ref in auth["spec"]["secretTargetRef"]:
                    assert ref["key"] in secrets[ref["name"]], n
    for n, svc in _by(docs, "Service").items():
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= tpl["metadata"]["labels"].items() for tpl in pods.values()), n
    for n, target in (
        (h["metadata"]["name"], h["spec"]["scaleTargetRef"]["name"])
        for h in _by(docs, "HorizontalPodAutoscaler").values()
    ):
        assert target in pods, n


def test_only_the_gateway_reaches_engines(docs: list[dict[str, Any]]) -> None:
    pods = _pod_specs(docs)
    engine_labels = pods["tunegate-engine"]["metadata"]["labels"]
    policies = [
        p
        for p in _by(docs, "NetworkPolicy").values()
        if p["spec"]["podSelector"]["matchLabels"].items() <= engine_labels.items()
    ]
    assert len(policies) == 1
    rules = policies[0]["spec"]["ingress"]
    pod_peers = [
        peer["podSelector"]["matchLabels"]
        for r in rules
        for peer in r["from"]
        if "podSelector" in peer
    ]
    allowed = [
        n
        for n, tpl in pods.items()
        if any(sel.items() <= tpl["metadata"]["labels"].items() for sel in pod_peers)
    ]
    assert allowed == ["tunegate-gateway"]
    # Other peers are namespaces (Prometheus scraping), never all pods of this namespace.
    for r in rules:
        for peer in r["from"]:
            assert set(peer) <= {"podSelector", "namespaceSelector"}
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"], "an empty selector admits all"


def test_engines_register_and_workers_scale(docs: list[dict[str, Any]]) -> None:
    pods = _pod_specs(docs)
    engine = pods["tunegate-engine"]["spec"]["containers"][0]
    args = engine["args"]
    assert args[:3] == ["tunegate", "engine", "serve"] and "--register" in args
    env = {e["name"] for e in engine["env"]}
    assert {"TUNEGATE_ENGINE_REGISTER_KEY", "TUNEGATE_ENGINE_API_KEY"} <= env
    gw = pods["tunegate-gateway"]["spec"]["containers"][0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    scaled = _by(docs, "ScaledObject")
    assert scaled["tunegate-trainer"]["spec"]["minReplicaCount"] == 0
    queues = {so["spec"]["triggers"][0]["metadata"].get("listName") for so in scaled.values()}
    cfg = _by(docs, "ConfigMap")["tunegate-config"]["data"]
    assert {cfg["TUNEGATE_TRAINER_QUEUE_NAME"], cfg["TUNEGATE_MONITOR_QUEUE_NAME"]} <= queues


def test_queries_parse() -> None:
    import promql_parser

    for so in _by(render(K8S / "base"), "ScaledObject").values():
        for trig in so["spec"]["triggers"]:
            if trig["type"] == "prometheus":
                promql_parser.parse(trig["metadata"]["query"])


def test_vendored_keda_schema_names_its_source() -> None:
    assert KEDA["source"] == "https://github.com/kedacore/keda"
    assert len(KEDA["commit"]) == 40
    assert {"keda.sh/v1alpha1/ScaledObject", "keda.sh/v1alpha1/TriggerAuthentication"} <= set(
        KEDA["kinds"]
    )
