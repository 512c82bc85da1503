"""The Prometheus alert rules (``deploy/prometheus/alerts.yml``): well-formed rules, PromQL that
parses (promql-parser, the Prometheus grammar; promtool is not installed), thresholds as issued,
and every metric a rule reads is one our processes export: the gateway's ``/metrics`` (taken from
a gateway app started in-process, router lifespans included) and the engine's (vLLM's names)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pq
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.embedded.metrics import EngineMetrics
from gateway.app import create_app
from gateway.settings import GatewaySettings
from trainer.metrics import WorkerMetrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                               "_created"),
             "summary": ("_count", "_sum", "_created"), "gauge": ("",)}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def walk(node: Any) -> Iterator[Any]:
    """Every node of a parsed PromQL expression."""
    yield node
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from walk(child)
    for arg in getattr(node, "args", None) or ():
        yield from walk(arg)


def selectors(expr: Any) -> list[Any]:
    return [n for n in walk(expr) if isinstance(n, pq.VectorSelector)]


def exported(text: str) -> dict[str, set[str]]:
    """Series name -> the label names seen, from an exposition text (names of families without
    samples yet are there too, with no labels known)."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


@pytest.fixture(scope="module")
def metric_names(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    data = tmp_path_factory.mktemp("alerts")
    settings = GatewaySettings(data_dir=data, database_url=None, redis_url=None,
                               engines=["http://127.0.0.1:9"], artifact_store=None)
    with TestClient(create_app(settings)) as client:
        gateway = client.get("/metrics").text
    engine = EngineMetrics("SmolLM2-135M-Instruct").render().decode()
    trainer = generate_latest(WorkerMetrics("tunegate:trainer").registry).decode()
    names = exported(gateway)
    for text in (engine, trainer):
        for name, labels in exported(text).items():
            names.setdefault(name, set()).update(labels)
    return names


def test_rules_are_well_formed() -> None:
    found = rules()
    assert len(found) >= 3
    for rule in found:
        assert rule["alert"].startswith("Tunegate") and rule["for"]
        assert rule["labels"]["severity"] in ("page", "warn")
        assert rule["annotations"]["summary"]
        pq.parse(rule["expr"])  # raises on anything Prometheus would refuse to load


def test_thresholds_are_the_issued_ones() -> None:
    by_name: dict[str, Any] = {r["alert"]: pq.parse(r["expr"]) for r in rules()}
    quality = by_name["TunegateQualityBelowThreshold"]
    assert str(quality.op) == "<" and quality.rhs.val == 0.95
    assert [s.name for s in selectors(quality)] == ["tunegate_quality_score"]
    for name in ("TunegateEngineTTFTHigh", "TunegateGatewayTTFTHigh"):
        ttft = by_name[name]
        assert str(ttft.op) == ">" and ttft.rhs.val == 0.1  # seconds: 100 ms
        assert ttft.lhs.func.name == "histogram_quantile" and ttft.lhs.args[0].val == 0.95
    queue = by_name["TunegateEngineQueueDeep"]
    assert str(queue.op) == ">" and queue.rhs.val == 50
    assert [s.name for s in selectors(queue)] == ["vllm:num_requests_waiting"]


def test_every_metric_is_exported(metric_names: dict[str, set[str]]) -> None:
    for rule in rules():
        expr = pq.parse(rule["expr"])
        for sel in selectors(expr):
            assert sel.name in metric_names, f"{rule['alert']}: {sel.name} is not exported"
            labels = metric_names[sel.name]
            grouped = [label for n in walk(expr) if isinstance(n, pq.AggregateExpr)
                       and n.modifier is not None for label in n.modifier.labels]
            # Where samples show the labels, the rule groups and matches by existing ones.
            # Prometheus adds the target's labels (instance, job) at scrape time.
            used = ({m.name for m in sel.matchers.matchers} | set(grouped)) - {
                "le", "instance", "job"}
            if labels:
                assert used <= labels, f"{rule['alert']}: {used - labels} not on {sel.name}"
