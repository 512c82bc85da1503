"""A real Prometheus (Debian's package) scraping a running system: Redis, an embedded engine
(real SmolLM2), a gateway and a trainer worker, under a short load (chat, streaming, an adapter
loaded on demand, a quota refusal, sampled traffic, a promotion, a quality run and a finished job
on record). Every query of the Grafana dashboard (its variables substituted) and every alert
expression (its left-hand side: a healthy system must not trip the threshold) is valid and
returns at least one series; the alert rules load healthy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import promql_parser as pq
import pytest
import yaml

from shared.job_records import JobStore
from shared.promotion import EvalRun
from tests.gateway.conftest import Records, auth, gateway
from tests.procs import free_port, run_server, stop
from tests.protocol_checks import make_adapter

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tunegate.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_S = 1
RATE_WINDOW = "30s"  # what $__rate_interval becomes here (several scrapes at 1 s)


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", RATE_WINDOW)
                    .replace('"$model"', '".*"'))
            out.append((panel["title"], expr))
    return out


def alert_queries() -> list[tuple[str, str]]:
    """Each rule's expression without its final threshold comparison."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = pq.parse(rule["expr"])
            if isinstance(expr, pq.BinaryExpr) and isinstance(expr.rhs, pq.NumberLiteral):
                expr = expr.lhs
            out.append((rule["alert"], expr.prettify()))
    return out


@contextlib.contextmanager
def prometheus(targets: dict[str, str], tmp: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: scripts/setup.sh installs Debian's package")
        pytest.skip("prometheus is missing: run scripts/setup.sh")
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [hostport]}]}
                           for name, hostport in targets.items()],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
        log.close()


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


def _hostport(url: str) -> str:
    return url.removeprefix("http://")


def _register(records: Records, name: str, model_dir: Path, seed: int) -> str:
    rel = f"staging/{uuid.uuid4().hex}"
    make_adapter(model_dir, Path(records.registry.store.root) / rel, rank=4, seed=seed,
                 targets=["q_proj", "v_proj"])
    return str(records.registry.register_version(name, rel, {"test": True}).ref)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
           default_model_dir: Path) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("prom")
    data = tmp / "data"
    data.mkdir()
    records = Records(data)
    # What the loop would have written by now: two versions of an adapter (v1 stable), a
    # quality run of v1 and a finished job that evaluated it.
    _register(records, "reviews", default_model_dir, seed=1)
    records.registry.set_alias("reviews", "stable", 1)
    _register(records, "reviews", default_model_dir, seed=2)
    with records.db.session() as s:
        s.add(EvalRun(name="reviews", version=1, kind="quality", n=20, score=0.9, metrics={}))
    jobs = JobStore(records.db)
    jobs.create("ftjob-seeded", model=default_model_dir.name, name="reviews", spec={},
                status="running")
    jobs.set_status("ftjob-seeded", "succeeded", fine_tuned_model="reviews@v1",
                    result={"eval": {"score": 0.9}})

    common = {"TUNEGATE_DATA_DIR": str(data), "TUNEGATE_DATABASE_URL": "",
              "TUNEGATE_ARTIFACT_STORE": "", "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"}
    stream = f"tunegate:test-prom:{uuid.uuid4().hex[:8]}"
    eport, wport = free_port(), free_port()
    worker_log = (tmp / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tunegate", "trainer", "worker"], stdout=worker_log,
        stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **common, "TUNEGATE_TRAINER_METRICS_PORT": str(wport),
             "TUNEGATE_TRAINER_METRICS_REFRESH_S": "1", "TUNEGATE_MONITOR_ENABLED": "false",
             "TUNEGATE_TRAINER_QUEUE_NAME": f"tunegate:test-prom:{uuid.uuid4().hex[:8]}",
             "TUNEGATE_TRAFFIC_STREAM": stream})
    engine_args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded", "--model",
                   str(default_model_dir), "--port", str(eport), "--max-model-len", "512",
                   "--max-num-seqs", "4", "--max-lora-rank", "8"]
    try:
        with run_server(engine_args, port=eport, log=tmp / "engine.log", timeout_s=240) as (
                engine, _), \
                gateway(data, [engine], redis_url, log=tmp / "gateway.log", env={
                    "TUNEGATE_GATEWAY_SAMPLE_RATE": "1", "TUNEGATE_GATEWAY_SAMPLE_STREAM": stream,
                    "TUNEGATE_GATEWAY_QUALITY_REFRESH_S": "1"}) as gw, \
                prometheus({"gateway": _hostport(gw), "engine": _hostport(engine),
                            "trainer": f"127.0.0.1:{wport}"}, tmp) as prom:
            yield {"gateway": gw, "prometheus": prom, "records": records}
    finally:
        stop(worker)
        worker_log.close()


def load(gw: str, records: Records) -> None:
    """A short, mixed load: what an on-call engineer's panels are about."""
    admin = records.key("admin")
    r = httpx.post(gw + "/admin/promotions", headers=auth(admin), timeout=30,
                   json={"version": "reviews@v2", "reason": "dashboard test"})
    assert r.status_code == 201, r.text
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0)
    messages = [{"role": "user", "content": "Is this review positive? Great film."}]
    for model in ("base", "reviews", "base", "reviews"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
        for _ in client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                                stream=True):
            pass
    limited = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user", rpm=1),
                            max_retries=0)
    limited.chat.completions.create(model="base", messages=messages, max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="base", messages=messages, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages)


def test_dashboard_and_alerts_against_a_real_prometheus(system: dict[str, Any]) -> None:
    prom = system["prometheus"]
    load(system["gateway"], system["records"])
    # Every target up, and enough scrapes after the load for the rate windows.
    deadline = time.monotonic() + 60
    while len(query(prom, "up == 1")) < 3:
        assert time.monotonic() < deadline, query(prom, "up")
        time.sleep(0.5)
    time.sleep(5 * SCRAPE_S)

    missing = []
    for title, expr in dashboard_queries():
        if not query(prom, expr):
            missing.append(f"panel {title!r}: {expr}")
    for alert, expr in alert_queries():
        if not query(prom, expr):
            missing.append(f"alert {alert}: {expr}")
    assert not missing, "queries returning no series:\n" + "\n".join(missing)

    # The model variable's query lists the models that took traffic.
    r = httpx.get(prom + "/api/v1/label/model/values",
                  params={"match[]": "tunegate_gateway_requests_total"}, timeout=10)
    assert {"base", "reviews"} <= set(r.json()["data"])

    # The rules load and evaluate; nothing fires on a healthy system.
    groups = httpx.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for g in groups for rule in g["rules"]]
    assert len(rules) == len(alert_queries())
    assert all(rule["health"] == "ok" for rule in rules), rules
    firing = [a for a in httpx.get(prom + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == []


def test_a_bad_query_is_refused(system: dict[str, Any]) -> None:
    r = httpx.get(system["prometheus"] + "/api/v1/query", params={"query": "sum(rate(x[5m]"},
                  timeout=10)
    assert r.status_code == 400 and r.json()["status"] == "error"
