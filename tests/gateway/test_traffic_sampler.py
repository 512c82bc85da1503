"""Traffic sampling through a real gateway process (fake engine replica, real Redis): who is
sampled, what a record holds (streams reassembled, scrubbed, trace id, lane), the response header,
and that Redis being down costs the client nothing."""

from __future__ import annotations

import json
import random
import secrets
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.gateway.conftest import Records, auth, chat, fake_replica, gateway
from tests.procs import free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def rid() -> str:
    # Letters only: the fake engine echoes the id in its answer, and digit runs could be scrubbed.
    return "t-" + "".join(random.choices(string.ascii_lowercase, k=20))


def sampling_env(stream: str, **extra: str) -> dict[str, str]:
    return {"TUNEGATE_GATEWAY_SAMPLE_STREAM": stream, "TUNEGATE_GATEWAY_SAMPLE_FLUSH_S": "0.01",
            "TUNEGATE_GATEWAY_SAMPLE_RATE": "0",
            "TUNEGATE_GATEWAY_SAMPLE_RATE_BY_MODEL": json.dumps({"base": 1.0}), **extra}


@pytest.fixture(scope="module")
def system(data_dir: Path, redis_url: str, records: Records) -> Iterator[dict[str, Any]]:
    stream = f"tunegate:test:{secrets.token_hex(4)}:traffic"
    records.adapter("sent")
    with fake_replica("r1") as (engine, _), gateway(
            data_dir, [engine], redis_url, env=sampling_env(stream)) as url:
        r = redis.Redis.from_url(redis_url)
        yield {"url": url, "stream": stream, "redis": r,
               "key": records.key(), "opt_out": records.key(sample_rate=0.0),
               "all": records.key(sample_rate=1.0)}
        r.delete(stream)
        r.close()


def record_of(system: dict[str, Any], request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        for _, fields in system["redis"].xrange(system["stream"]):
            rec = json.loads(fields[b"r"])
            if request_id in (rec["request_id"], rec.get("client_request_id")):
                return rec  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"no sample of {request_id}"
        time.sleep(0.05)


def recorded(system: dict[str, Any], request_id: str) -> bool:
    return any(request_id in (rec["request_id"], rec.get("client_request_id"))
               for rec in (json.loads(f[b"r"]) for _, f in system["redis"].xrange(
                   system["stream"])))


def post(system: dict[str, Any], path: str, key: str, body: dict[str, Any],
         request_id: str, **headers: str) -> httpx.Response:
    return httpx.post(system["url"] + path, json=body, timeout=30,
                      headers={**auth(key), "x-request-id": request_id, **headers})


def test_non_streaming_record(system: dict[str, Any]) -> None:
    r_id = rid()
    body = {"model": "base", "max_tokens": 8,
            "messages": [{"role": "user", "content": "mail me at ann@example.org"}]}
    resp = post(system, "/v1/chat/completions", system["key"], body, r_id,
                traceparent=f"00-{TRACE}-00f067aa0ba902b7-01")
    assert resp.status_code == 200 and resp.headers["x-tunegate-sampled"] == "1"
    rec = record_of(system, r_id)
    answer = resp.json()["choices"][0]["message"]["content"]
    # The gateway's own id is the record's (and the engine's); the client's is kept and echoed.
    assert rec["request_id"] == resp.headers["x-tunegate-request-id"] != r_id
    assert rec["client_request_id"] == r_id == resp.headers["x-request-id"]
    assert rec["output"] == answer == f"r1|fake-base|{rec['request_id']}"
    # The client's body as sent (not the upstream id the gateway rewrote), scrubbed.
    assert rec["request"] == {**body, "messages": [
        {"role": "user", "content": "mail me at [email]"}]}
    assert rec["model"] == "base" and rec["name"] == "base" and rec["version"] is None
    assert rec["lane"] == "base" and rec["status"] == 200 and rec["route"] == "/v1/chat/completions"
    assert rec["trace_id"] == TRACE and rec["ttft_ms"] is None
    assert rec["key_id"].startswith("key_") and 0 < rec["latency_ms"] < 10_000
    assert abs(rec["created_at"] - time.time()) < 60
    assert system["redis"].get(f"{system['stream']}:owner:{rec['key_id']}:{rec['request_id']}")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_is_reassembled(system: dict[str, Any], path: str) -> None:
    r_id = rid()
    field = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
             else {"prompt": "hi"})
    with httpx.stream("POST", system["url"] + path, timeout=30,
                      json={"model": "base", "stream": True, **field},
                      headers={**auth(system["key"]), "x-request-id": r_id}) as resp:
        assert resp.headers["x-tunegate-sampled"] == "1"
        text = "".join(resp.iter_text())
    assert "[DONE]" in text
    rec = record_of(system, r_id)
    assert rec["output"] == f"r1|fake-base|{rec['request_id']}" and rec["status"] == 200
    assert rec["ttft_ms"] is not None and 0 < rec["ttft_ms"] <= rec["latency_ms"]
    assert rec["request"]["stream"] is True and "stream_options" not in rec["request"]


def test_generate_route_is_sampled(system: dict[str, Any]) -> None:
    r_id = rid()
    resp = post(system, "/v1/generate", system["key"], {"prompt": "hello", "max_tokens": 4}, r_id)
    assert resp.status_code == 200 and resp.headers["x-tunegate-sampled"] == "1"
    rec = record_of(system, r_id)
    assert rec["output"] == resp.json()["text"]
    assert rec["request"]["messages"] == [{"role": "user", "content": "hello"}]


def test_mid_stream_failure_is_recorded_with_its_status(system: dict[str, Any]) -> None:
    r_id = rid()
    with httpx.stream("POST", system["url"] + "/v1/chat/completions", timeout=30,
                      json={"model": "base", "stream": True,
                            "messages": [{"role": "user", "content": "FAIL_MIDSTREAM"}]},
                      headers={**auth(system["key"]), "x-request-id": r_id}) as resp:
        "".join(resp.iter_text())
    rec = record_of(system, r_id)
    assert rec["status"] == 502 and rec["output"] == f"r1|fake-base|{rec['request_id']}"[:16]


def test_rates_per_key_and_model(system: dict[str, Any]) -> None:
    # Key opted out (0) on a model sampled at 100%: never; key at 100% on a model at 0%: always.
    skipped, pinned, stable = rid(), rid(), rid()
    resp = post(system, "/v1/chat/completions", system["opt_out"],
                {"model": "base", "messages": [{"role": "user", "content": "x"}]}, skipped)
    assert resp.status_code == 200 and "x-tunegate-sampled" not in resp.headers
    default_on_adapter = rid()
    resp = post(system, "/v1/chat/completions", system["key"],
                {"model": "sent", "messages": [{"role": "user", "content": "x"}]},
                default_on_adapter)
    assert resp.status_code == 200 and "x-tunegate-sampled" not in resp.headers
    for model, r_id in (("sent@v1", pinned), ("sent", stable)):
        resp = post(system, "/v1/chat/completions", system["all"],
                    {"model": model, "messages": [{"role": "user", "content": "x"}]}, r_id)
        assert resp.status_code == 200 and resp.headers["x-tunegate-sampled"] == "1"
    assert record_of(system, pinned)["lane"] == "pinned"
    rec = record_of(system, stable)  # written after the two unsampled ones (one FIFO buffer)
    assert (rec["lane"], rec["name"], rec["version"], rec["model"]) == ("stable", "sent", 1, "sent")
    assert not recorded(system, skipped) and not recorded(system, default_on_adapter)


def test_key_sample_rate_through_admin_api(system: dict[str, Any], records: Records) -> None:
    admin = records.key("admin")
    url = system["url"] + "/admin/keys"
    made = httpx.post(url, headers=auth(admin), json={"name": "s", "sample_rate": 0.25})
    assert made.status_code == 201 and made.json()["sample_rate"] == 0.25
    key_id = made.json()["id"]
    patched = httpx.patch(f"{url}/{key_id}", headers=auth(admin), json={"sample_rate": 0})
    assert patched.status_code == 200 and patched.json()["sample_rate"] == 0
    cleared = httpx.patch(f"{url}/{key_id}", headers=auth(admin), json={"sample_rate": None})
    assert cleared.json()["sample_rate"] is None
    bad = httpx.patch(f"{url}/{key_id}", headers=auth(admin), json={"sample_rate": 1.5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sample_rate"


def test_redis_down_costs_the_client_nothing(data_dir: Path, records: Records) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    key = records.key()
    with fake_replica("r2") as (engine, _), gateway(
            data_dir, [engine], dead, env=sampling_env("tunegate:test:dead")) as url:
        for _ in range(5):
            resp = chat(url, key)
            assert resp.status_code == 200
            assert resp.json()["choices"][0]["message"]["content"].startswith("r2|")
        deadline = time.monotonic() + 10
        while True:
            metrics = httpx.get(url + "/metrics").text
            failed = [line for line in metrics.splitlines()
                      if line.startswith('tunegate_gateway_samples_total{outcome="failed"}')]
            if failed and float(failed[0].split()[-1]) >= 1:
                break
            assert time.monotonic() < deadline, "no failed sample counted"
            time.sleep(0.2)


def test_keys_cli_sample_rate(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "TUNEGATE_DATA_DIR": str(tmp_path), "TUNEGATE_DATABASE_URL": ""}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tunegate", "keys", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    made = cli("create", "--name", "cli", "--sample-rate", "0.5", "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["sample_rate"] == 0.5
    assert cli("sample-rate", info["id"], "0").stdout.strip().endswith("sample_rate: 0.0")
    assert "default" in cli("sample-rate", info["id"], "default").stdout
    assert json.loads(cli("list", "--json").stdout)[0]["sample_rate"] is None
    assert cli("sample-rate", info["id"], "2").returncode == 2
    assert cli("sample-rate", info["id"], "lots").returncode == 2
