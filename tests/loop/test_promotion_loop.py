"""The closed loop end to end on CPU with the real SmolLM2: a real embedded engine, a real gateway
(uvicorn), a real Redis, a real ``tunegate trainer worker`` (training, traffic ingestion and the
monitor's cron jobs), the real ``openai`` SDK as client.

1. A good tune (Rotten Tomatoes, 20 steps) becomes ``rt@v1``, straight to ``stable`` (the first
   version of a name). Traffic flows through the gateway (sampling at 100%); samples land in SQL;
   feedback labels them; the quality monitor scores them (``tunegate_quality_score``).
2. A tune on another dataset's labels (positive/negative: a broken export) passes the (disabled)
   golden gate, enters promotion as a candidate,
   and an operator pushes it to canary through the admin API; the monitor rolls it back by itself
   on the canary lane's labelled quality, and ``stable`` never moves.
3. Another good tune enters as a candidate and earns its way by itself: shadow (mirrored copies,
   a shadow evaluation replaying labelled stable-lane prompts), canary, then ``stable``.
"""

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

from shared.data import write_jsonl
from tests.gateway.conftest import Records, auth, gateway
from tests.procs import free_port, redis_server, run_server, stop
from trainer.data_sources import INSTRUCTION, build_splits

MODEL = "SmolLM2-135M-Instruct"
STEPS = 20
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory,
           default_model_dir: Path) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("loop")
    (data_dir / "models").mkdir()
    (data_dir / "models" / MODEL).symlink_to(default_model_dir, target_is_directory=True)
    records = Records(data_dir)
    admin, user = records.key("admin"), records.key("user")
    tag = secrets.token_hex(4)
    env = {
        "TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_DATABASE_URL": "",
        "TUNEGATE_ARTIFACT_STORE": "", "HF_HUB_OFFLINE": "1",
        "TUNEGATE_TRAINER_QUEUE_NAME": f"tunegate:test:{tag}",
        "TUNEGATE_TRAINER_PROGRESS_INTERVAL_S": "0",
        "TUNEGATE_TRAFFIC_STREAM": f"tunegate:test:traffic:{tag}",
        "TUNEGATE_GATEWAY_SAMPLE_RATE": "1.0",
        "TUNEGATE_GATEWAY_QUALITY_REFRESH_S": "1",
        # Gates sized for a test: 80 labelled samples decide; a candidate must reach 0.6 and stay
        # within 0.25 of stable; half of the bare-name traffic goes to the canary. The two lanes
        # see different reviews, and on the held-out reviews accuracy is only 0.65-0.85, so each
        # lane's score is noisy: on 80 samples the difference of two lanes has a standard error
        # near 0.065 (a good candidate once came within 0.143 of stable), so 0.25 is almost
        # never crossed by chance. The bad candidate answers outside the label set (quality 0),
        # so the gate need not be tight: a shuffled-label candidate (about 0.5) once passed at
        # 0.61 against stable's 0.70 with 0.15, and no test-sized sample separates it reliably.
        "TUNEGATE_PROMOTION_CANARY_WEIGHT": "0.5", "TUNEGATE_PROMOTION_SHADOW_FRACTION": "0.5",
        "TUNEGATE_PROMOTION_MIN_SAMPLES": "80", "TUNEGATE_PROMOTION_MIN_QUALITY": "0.6",
        "TUNEGATE_PROMOTION_TOLERANCE": "0.25", "TUNEGATE_PROMOTION_MIN_REQUESTS": "10",
        "TUNEGATE_PROMOTION_MAX_ERROR_RATE": "0.2",
        "TUNEGATE_MONITOR_QUEUE_NAME": f"tunegate:test:monitor:{tag}",
        "TUNEGATE_MONITOR_QUALITY_INTERVAL_S": "5", "TUNEGATE_MONITOR_SHADOW_INTERVAL_S": "10",
        "TUNEGATE_MONITOR_TICK_INTERVAL_S": "5", "TUNEGATE_MONITOR_SHADOW_SAMPLES": "80",
        "TUNEGATE_MONITOR_API_KEY": user,
    }
    port = free_port()
    with redis_server() as redis_url, pytest.MonkeyPatch.context() as mp:
        for k, v in {**env, "REDIS_URL": redis_url}.items():
            mp.setenv(k, v)
        engine_args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded", "--model",
                       str(default_model_dir), "--port", str(port), "--max-loras", "3",
                       "--max-lora-rank", "16", "--max-model-len", "512", "--max-num-seqs", "4"]
        with run_server(engine_args, port=port, log=data_dir / "engine.log",
                        timeout_s=240) as (engine, _), \
                gateway(data_dir, [engine], redis_url, log=data_dir / "gateway.log") as url:
            log = (data_dir / "worker.log").open("wb")
            worker = subprocess.Popen(
                [sys.executable, "-m", "tunegate", "trainer", "worker"],
                env={**os.environ, "TUNEGATE_MONITOR_GATEWAY_URL": url}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
            try:
                yield {"url": url, "admin": admin, "user": user, "data_dir": data_dir,
                       "records": records,
                       "sdk": openai.OpenAI(base_url=f"{url}/v1", api_key=admin, max_retries=0),
                       "client": openai.OpenAI(base_url=f"{url}/v1", api_key=user,
                                               max_retries=2)}
            finally:
                stop(worker)
                log.close()


@pytest.fixture(scope="module")
def data(system: dict[str, Any]) -> dict[str, Any]:
    train, golden = build_splits(n_train=400, n_golden=40, seed=0)
    _, traffic = build_splits(n_train=2, n_golden=80, seed=7)  # held-out reviews to serve
    d = system["data_dir"]
    sdk = system["sdk"]

    def upload(name: str, rows: list[dict[str, Any]]) -> str:
        with write_jsonl(d / name, rows).open("rb") as f:
            return str(sdk.files.create(file=f, purpose="fine-tune").id)

    return {"train": upload("train.jsonl", train), "golden": upload("golden.jsonl", golden),
            "mislabelled": upload("mislabelled.jsonl", [
                {**r, "output": {"fresh": "positive", "rotten": "negative"}[r["output"]]}
                for r in train]),
            "traffic": traffic}


def tune(system: dict[str, Any], data: dict[str, Any], file_key: str, seed: int,
         steps: int = STEPS) -> str:
    sdk: openai.OpenAI = system["sdk"]
    job = sdk.fine_tuning.jobs.create(
        model=MODEL, training_file=data[file_key], suffix="rt", seed=seed,
        hyperparameters={"batch_size": 8, "n_epochs": 1, "learning_rate_multiplier": 5},
        extra_body={"golden_file": data["golden"], "max_steps": steps, "gate_threshold": 0.0,
                    "gate_tolerance": 1.0, "lora_r": 8, "lora_alpha": 16})
    deadline = time.monotonic() + 600
    while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "training took too long"
        time.sleep(1)
    assert job.status == "succeeded", job.error
    print(f"{file_key} seed {seed}: {job.fine_tuned_model}, golden "
          f"{(job.model_extra or {}).get('tunegate', {}).get('result', {}).get('eval')}")
    return str(job.fine_tuned_model)


class Traffic:
    """Bare-``rt`` requests over the held-out reviews, each labelled through /v1/feedback."""

    def __init__(self, system: dict[str, Any], reviews: list[dict[str, Any]]) -> None:
        self.system, self.reviews, self.i = system, reviews, 0
        self.served: dict[str, int] = {}

    def one(self) -> None:
        review = self.reviews[self.i % len(self.reviews)]
        self.i += 1
        raw = self.system["client"].chat.completions.with_raw_response.create(
            model="rt", temperature=0, max_tokens=3,
            extra_headers={"x-request-id": f"loop-{secrets.token_hex(8)}"},
            messages=[{"role": "user", "content": f"{INSTRUCTION}\n\n{review['input']}"}])
        resp = raw.parse()
        rid = raw.headers["x-tunegate-request-id"]  # feedback names the gateway's id
        self.served[resp.model] = self.served.get(resp.model, 0) + 1
        r = httpx.post(self.system["url"] + "/v1/feedback", headers=auth(self.system["user"]),
                       json={"request_id": rid, "label": review["output"]}, timeout=30)
        assert r.status_code in (200, 202), r.text

    def until(self, done: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            for _ in range(5):
                self.one()
            got = done()
            if got:
                return got
            assert time.monotonic() < deadline, f"not done; served {self.served}"


def promotion(system: dict[str, Any]) -> dict[str, Any]:
    r = httpx.get(system["url"] + "/admin/promotions/rt", headers=auth(system["admin"]),
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def aliases(system: dict[str, Any]) -> dict[str, int]:
    return system["records"].registry.get_adapter("rt")["aliases"]  # type: ignore[no-any-return]


def test_first_version_is_stable_and_traffic_is_scored(system: dict[str, Any],
                                                        data: dict[str, Any]) -> None:
    assert tune(system, data, "train", seed=0) == "rt@v1"
    assert aliases(system)["stable"] == 1
    r = httpx.get(system["url"] + "/admin/promotions/rt", headers=auth(system["admin"]))
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    traffic = Traffic(system, data["traffic"])

    def scored() -> str | None:
        text = httpx.get(system["url"] + "/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith("tunegate_quality_score{")]
        return next((ln for ln in lines if 'model="rt"' in ln and 'version="v1"' in ln), None)

    line = traffic.until(scored, 180)
    print(f"quality gauge: {line}")
    assert traffic.served == {"rt@v1": traffic.i}


def test_bad_candidate_is_rolled_back_during_canary(system: dict[str, Any],
                                                     data: dict[str, Any]) -> None:
    assert tune(system, data, "mislabelled", seed=0) == "rt@v2"
    p = promotion(system)
    assert p["version"] == 2 and p["events"][0]["actor"].startswith("trainer:")
    # An operator pushes it to canary (the monitor might have moved it to shadow meanwhile).
    for _ in range(5):
        r = httpx.post(system["url"] + "/admin/promotions/rt/promote",
                       headers=auth(system["admin"]), timeout=30,
                       json={"to": "canary", "reason": "try it on users"})
        if r.status_code == 200:
            break
        assert r.status_code == 409, r.text
    assert promotion(system)["state"] == "canary" and aliases(system)["canary"] == 2
    traffic = Traffic(system, data["traffic"])
    p = traffic.until(lambda: (q := promotion(system))["state"] != "canary" and q, 600)
    print(f"bad candidate: {p['events'][-1]}; served {traffic.served}")
    assert p["state"] == "rolled_back"
    last = p["events"][-1]
    assert last["actor"] == "monitor" and "quality" in last["reason"]
    assert traffic.served.get("rt@v2", 0) > 0
    assert aliases(system)["stable"] == 1 and aliases(system)["canary"] == 1
    time.sleep(1)  # the gateway's routing table refreshes within its cache TTL (0.2 s here)
    after = Traffic(system, data["traffic"])
    for _ in range(10):
        after.one()
    assert after.served == {"rt@v1": 10}


def test_good_candidate_reaches_stable_by_itself(system: dict[str, Any],
                                                 data: dict[str, Any]) -> None:
    # The first recipe run twice as long: a new version at least as good as stable. (Another
    # seed or data order is not a safe "good" candidate: 20 steps can leave a tune stuck on one
    # label; and 25 steps once scored 0.70 on the golden set, below stable.)
    assert tune(system, data, "train", seed=0, steps=2 * STEPS) == "rt@v3"
    traffic = Traffic(system, data["traffic"])
    p = traffic.until(lambda: (q := promotion(system))["state"] in (
        "stable", "rejected", "rolled_back") and q, 600)
    steps = [(e["from_state"], e["to_state"], e["actor"], e["reason"]) for e in p["events"]
             if e["promotion_id"] == p["id"]]
    print(f"good candidate: {steps}; served {traffic.served}")
    assert p["state"] == "stable", steps
    assert [s[:2] for s in steps] == [(None, "candidate"), ("candidate", "shadow"),
                                      ("shadow", "canary"), ("canary", "stable")]
    assert all(s[2] == "monitor" for s in steps[1:])
    assert aliases(system)["stable"] == 3
    shadow = [e for e in p["evals"] if e["kind"] == "shadow"]
    assert shadow and shadow[0]["metrics"]["replayed"] > 0
    assert shadow[0]["metrics"]["agreement"] is not None
