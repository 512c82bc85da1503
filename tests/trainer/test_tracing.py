"""A fine-tuning job traced from the API call to the registered version, and the worker's
metrics: a gateway process and a real ``tunegate trainer worker`` process (real Redis, the real
SmolLM2 tuned for two steps on CPU), both exporting to an OTLP/HTTP endpoint in this process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.data import write_jsonl
from tests.gateway.conftest import Records, fake_replica, gateway
from tests.otlp import Collector, Span, collector, connected, otel_env
from tests.procs import free_port, stop
from trainer.data_sources import build_splits

MODEL = "SmolLM2-135M-Instruct"
PHASES = ("validate", "train", "evaluate", "gate", "register")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traced-job")


@pytest.fixture(scope="module")
def system(data_dir: Path, redis_url: str, default_model_dir: Path,
           ) -> Iterator[dict[str, Any]]:
    (data_dir / "models").mkdir(exist_ok=True)
    (data_dir / "models" / MODEL).symlink_to(default_model_dir, target_is_directory=True)
    records = Records(data_dir)
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    metrics_port = free_port()
    with collector() as otlp:
        env = {"TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_DATABASE_URL": "",
               "TUNEGATE_ARTIFACT_STORE": "", "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
               "TUNEGATE_TRAINER_QUEUE_NAME": queue, "TUNEGATE_TRAINER_PROGRESS_INTERVAL_S": "0",
               "TUNEGATE_TRAINER_METRICS_PORT": str(metrics_port),
               "TUNEGATE_TRAINER_METRICS_REFRESH_S": "0.5", "TUNEGATE_MONITOR_ENABLED": "false",
               **otel_env(otlp)}
        log = (data_dir / "worker.log").open("wb")
        worker = subprocess.Popen([sys.executable, "-m", "tunegate", "trainer", "worker"],
                                  env={**os.environ, **env}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("TUNEGATE_TRAINER_QUEUE_NAME", queue)
                with fake_replica("r1") as (engine, _), \
                        gateway(data_dir, [engine], redis_url, env=otel_env(otlp)) as url:
                    client = openai.OpenAI(base_url=f"{url}/v1", api_key=records.key("admin"),
                                           max_retries=0)
                    yield {"client": client, "otlp": otlp, "records": records,
                           "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
        finally:
            stop(worker)
            log.close()


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_job_is_one_trace_from_the_api_call_to_the_registered_version(
        system: dict[str, Any], data_dir: Path) -> None:
    client: openai.OpenAI = system["client"]
    otlp: Collector = system["otlp"]
    train, golden = build_splits(n_train=40, n_golden=4, seed=0)
    with write_jsonl(data_dir / "t.jsonl", train).open("rb") as f:
        f_train = client.files.create(file=f, purpose="fine-tune")
    with write_jsonl(data_dir / "g.jsonl", golden).open("rb") as f:
        f_golden = client.files.create(file=f, purpose="fine-tune")
    raw = client.fine_tuning.jobs.with_raw_response.create(
        model=MODEL, training_file=f_train.id, suffix="traced", seed=1,
        hyperparameters={"batch_size": 4, "n_epochs": 1},
        extra_body={"golden_file": f_golden.id, "max_steps": 2, "gate_threshold": 0.0})
    rid = raw.headers["x-request-id"]
    job = raw.parse()
    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "traced@v1"

    def ours(spans: list[Span]) -> list[Span]:
        api = [s for s in spans if s.attributes.get("tunegate.request_id") == rid]
        return [s for s in spans if api and s.trace_id == api[0].trace_id]

    def complete(spans: list[Span]) -> bool:
        return {"fine-tuning job", *PHASES} <= {s.name for s in ours(spans)}

    trace = ours(otlp.wait_for(complete, timeout_s=30))
    assert complete(trace), sorted(s.name for s in trace)
    assert connected(trace), [(s.name, s.span_id, s.parent_id) for s in trace]
    by = {s.name: s for s in trace}
    api, jspan = by["POST /v1/fine_tuning/jobs"], by["fine-tuning job"]
    assert api.service == "tunegate-gateway" and jspan.service == "tunegate-trainer"
    assert jspan.parent_id == api.span_id  # the job continues the request's trace
    assert jspan.attributes["tunegate.job.id"] == job.id
    assert jspan.attributes["tunegate.fine_tuned_model"] == "traced@v1"
    for name in PHASES:
        assert by[name].parent_id == jspan.span_id, name
    starts = [by[n].start_ns for n in PHASES]
    assert starts == sorted(starts)  # in pipeline order
    assert by["train"].attributes["tunegate.train.steps"] == 2
    assert by["gate"].attributes["tunegate.gate.passed"] is True
    assert by["register"].attributes["tunegate.adapter.version"] == "traced@v1"

    # The worker's metrics saw the job.
    deadline = time.monotonic() + 10
    while True:
        m = _scrape(system["metrics"])
        if m.get(("tunegate_trainer_jobs", (("state", "succeeded"),))) == 1.0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.5)
    assert m[("tunegate_trainer_job_duration_seconds_count", (("status", "succeeded"),))] == 1
    assert m[("tunegate_trainer_eval_score", (("model", "traced"),))] >= 0.0
    assert m[("tunegate_trainer_train_loss", ())] > 0
    assert m[("tunegate_trainer_job_running", ())] == 0
    assert any(k[0] == "tunegate_trainer_queue_oldest_job_age_seconds" for k in m)
    assert any(k[0] == "tunegate_trainer_traffic_ingest_lag_seconds" for k in m)
