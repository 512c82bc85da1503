"""Files and fine-tuning jobs through the real ``openai`` SDK against a gateway process, with a
real ``tunegate trainer worker`` process on real Redis training the real SmolLM2 on CPU."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.data import write_jsonl
from tests.gateway.conftest import Records, fake_replica, gateway
from tests.procs import stop
from trainer.data_sources import build_splits

MODEL = "SmolLM2-135M-Instruct"
PRICE = 2.5  # the worker's price per device-hour (TUNEGATE_TRAINER_PRICE_PER_DEVICE_HOUR)


@pytest.fixture(scope="module")
def system(data_dir: Path, redis_url: str, default_model_dir: Path,
           records: Records) -> Iterator[dict[str, Any]]:
    (data_dir / "models").mkdir(exist_ok=True)
    (data_dir / "models" / MODEL).symlink_to(default_model_dir, target_is_directory=True)
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    env = {"TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_DATABASE_URL": "",
           "TUNEGATE_ARTIFACT_STORE": "", "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1",
           "TUNEGATE_TRAINER_QUEUE_NAME": queue, "TUNEGATE_TRAINER_PROGRESS_INTERVAL_S": "0",
           "TUNEGATE_TRAINER_PRICE_PER_DEVICE_HOUR": str(PRICE)}
    log = (data_dir / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "tunegate", "trainer", "worker"],
                              env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEGATE_TRAINER_QUEUE_NAME", queue)  # the gateway enqueues on the same queue
        with fake_replica("r1") as (engine, _), gateway(data_dir, [engine], redis_url) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=records.key("admin"),
                                   max_retries=0)
            try:
                yield {"client": client, "url": url, "records": records, "data_dir": data_dir}
            finally:
                stop(worker)
                log.close()


def upload(client: openai.OpenAI, path: Path) -> Any:
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def wait_status(client: openai.OpenAI, job_id: str, statuses: set[str], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.5)


def test_file_with_three_percent_invalid_is_refused(system: dict[str, Any]) -> None:
    train, _ = build_splits(n_train=100, n_golden=2, seed=3)
    lines = [json.dumps(r) for r in train]
    for n in (5, 6, 7):
        lines[n] = '{"instruction": '
    path = system["data_dir"] / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(openai.BadRequestError) as err:
        upload(system["client"], path)
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_training_file"
    assert "line 6: invalid JSON" in body["message"] and "line 8: invalid JSON" in body["message"]


def test_job_lifecycle_through_the_sdk(system: dict[str, Any]) -> None:
    client: openai.OpenAI = system["client"]
    train, golden = build_splits(n_train=120, n_golden=8, seed=0)
    f_train = upload(client, write_jsonl(system["data_dir"] / "t.jsonl", train))
    f_golden = upload(client, write_jsonl(system["data_dir"] / "g.jsonl", golden))
    assert client.files.retrieve(f_train.id).bytes == f_train.bytes > 0
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=f_train.id, suffix="rt-api", seed=1,
        hyperparameters={"batch_size": 4, "n_epochs": 1, "learning_rate_multiplier": 2},
        extra_body={"golden_file": f_golden.id, "max_steps": 2, "gate_threshold": 0.0},
    )
    assert job.status == "queued" and job.id.startswith("ftjob-")
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"}, 600)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "rt-api@v1"
    assert done.trained_tokens and done.trained_tokens > 0
    assert system["records"].registry.resolve("rt-api").version == 1
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("Job succeeded")  # newest first
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == [1, 2]
    assert all({"step", "train_loss", "total_steps"} <= set(e.data or {})
               for e in events if e.type == "metrics")
    assert done.estimated_finish is None and len(done.result_files) == 1
    csv = client.files.content(done.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss,learning_rate,tokens_per_s")
    assert [r.split(",")[0] for r in csv[1:]] == ["1", "2"]
    assert done.hyperparameters.n_epochs == 1  # given, not auto
    listed = client.fine_tuning.jobs.list(limit=10).data
    assert job.id in [j.id for j in listed]
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts[0].fine_tuned_model_checkpoint == "rt-api@v1"
    # What the job cost (trainer.cost): in the job object, its events, its checkpoint's metrics.
    cost = (done.model_extra or {})["tunegate"]["cost"]
    secs = cost["device_seconds"]
    assert cost["trained_tokens"] == done.trained_tokens
    assert secs["train"] > 0 and secs["evaluate"] > 0 and secs["validate"] > 0
    assert secs["total"] == pytest.approx(
        sum(secs[p] for p in ("validate", "train", "evaluate", "register")), abs=0.3)
    assert cost["price_per_device_hour"] == PRICE
    assert cost["estimated_cost"] == pytest.approx(secs["total"] / 3600 * PRICE, rel=0.01)
    assert [e.data["cost"] for e in events if e.message.startswith("Cost: ")] == [cost]
    extra = ckpts[0].metrics.model_extra or {}
    assert extra["estimated_cost"] == cost["estimated_cost"]
    assert extra["device_seconds"] == secs["total"]

    long = client.fine_tuning.jobs.create(
        model=MODEL, training_file=f_train.id, suffix="rt-api-cancel",
        extra_body={"golden_file": f_golden.id, "max_steps": 500, "gate_threshold": 0.0},
    )
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id).data):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    running = client.fine_tuning.jobs.retrieve(long.id)
    # "auto" epochs for 120 examples: 3 (OpenAI's rule), and the job says so.
    assert running.hyperparameters.n_epochs == 3
    assert (running.model_extra or {})["tunegate"]["auto"] == {"n_epochs": 3}
    if running.status == "running":
        assert running.trained_tokens and running.estimated_finish
    page = client.fine_tuning.jobs.list_events(long.id).data  # default page: milestones visible
    assert any(e.message.startswith("Training with the") for e in page)
    client.fine_tuning.jobs.cancel(long.id)
    ended = wait_status(client, long.id, {"succeeded", "failed", "cancelled"}, 120)
    assert ended.status == "cancelled" and ended.fine_tuned_model is None
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_bad_requests_are_4xx(system: dict[str, Any]) -> None:
    client: openai.OpenAI = system["client"]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-missing")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="no-such-model", training_file="file-missing")


def test_user_keys_are_refused(system: dict[str, Any]) -> None:
    user = openai.OpenAI(base_url=f"{system['url']}/v1", api_key=system["records"].key("user"),
                         max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        user.fine_tuning.jobs.list()
    with pytest.raises(openai.PermissionDeniedError):
        user.files.retrieve("file-x")
