"""The OpenAI surface through a real gateway process, with the real `openai` SDK as the client,
in front of a fake replica (fast; the same calls run against the real engine in
test_engine_e2e.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import Records, auth, chat, fake_replica, fresh_window, gateway


@pytest.fixture(scope="module")
def gw(data_dir: Path, redis_url: str) -> Iterator[str]:
    with fake_replica("r1") as (engine, _), gateway(data_dir, [engine], redis_url) as url:
        yield url


@pytest.fixture(scope="module")
def user_key(records: Records) -> str:
    return records.key("user")


def client(gw: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw + "/v1", api_key=key, max_retries=0)


def test_chat_completion_and_request_id(gw: str, user_key: str) -> None:
    raw = client(gw, user_key).chat.completions.with_raw_response.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        extra_headers={"X-Request-ID": "req-abc-123"})
    resp = raw.parse()
    assert raw.headers["x-request-id"] == "req-abc-123"
    # The fake answers "<replica>|<model sent upstream>|<request id it received>": the engine
    # gets the gateway's own id (x-tunegate-request-id), never one a client chose.
    own = raw.headers["x-tunegate-request-id"]
    assert own != "req-abc-123" and len(own) == 32
    assert resp.choices[0].message.content == f"r1|fake-base|{own}"
    assert resp.model == "base"
    assert resp.usage.total_tokens == 8


def test_request_id_is_made_when_absent(gw: str, user_key: str) -> None:
    r = chat(gw, user_key)
    rid = r.headers["x-request-id"]
    assert len(rid) >= 16
    assert r.json()["choices"][0]["message"]["content"].endswith("|" + rid)


def test_completions(gw: str, user_key: str) -> None:
    resp = client(gw, user_key).completions.create(model="base", prompt="Say hi", max_tokens=4)
    assert resp.choices[0].text.startswith("r1|fake-base|")
    assert resp.model == "base"


def test_streaming_chunks_and_done(gw: str, user_key: str) -> None:
    stream = client(gw, user_key).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"X-Request-ID": "stream-1"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stream.response.headers["x-request-id"] == "stream-1"
    assert text == f"r1|fake-base|{stream.response.headers['x-tunegate-request-id']}"
    assert all(c.model == "base" for c in chunks)
    assert len(chunks) > 3
    assert all(c.usage is None for c in chunks)  # usage not asked for: not passed on


def test_streaming_usage_when_asked(gw: str, user_key: str) -> None:
    stream = client(gw, user_key).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.usage is not None and last.usage.completion_tokens == 3


def test_sse_headers_and_raw_stream(gw: str, user_key: str) -> None:
    body = {"model": "base", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", gw + "/v1/chat/completions", json=body, headers=auth(user_key),
                      timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"


def test_adapter_by_name_alias_and_version(gw: str, user_key: str, records: Records) -> None:
    ref = records.adapter("support")
    c = client(gw, user_key)
    for model in ["support", "support:stable", "support:latest", ref]:
        resp = c.chat.completions.create(model=model, messages=[{"role": "user",
                                                                 "content": "x"}])
        assert resp.model == ref
        assert resp.choices[0].message.content.startswith(f"r1|{ref}|")
    listed = {m.id: m for m in c.models.list()}
    assert {"base", "support", "support:stable", "support:latest"} <= set(listed)
    # what each name and alias answers with now
    assert (listed["support"].model_extra or {})["resolves_to"] == ref
    assert (listed["support:latest"].model_extra or {})["resolves_to"] == ref


def test_models_list_respects_allowed_models(gw: str, records: Records) -> None:
    records.adapter("hidden")
    key = records.key("user", models=["base"])
    ids = {m.id for m in client(gw, key).models.list()}
    assert "base" in ids and not any(i.startswith("hidden") for i in ids)


def test_authentication_error(gw: str) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(gw, "tg-not-a-real-key-0000000000").models.list()
    assert err.value.body["type"] == "authentication_error"  # type: ignore[index]
    r = httpx.get(gw + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_permission_denied_for_model_not_allowed(gw: str, records: Records) -> None:
    records.adapter("secret")
    key = records.key("user", models=["base"])
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, key).chat.completions.create(
            model="secret", messages=[{"role": "user", "content": "x"}])


def test_not_found_for_unknown_model(gw: str, user_key: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(gw, user_key).chat.completions.create(
            model="does-not-exist", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("body", [
    {"model": "base"},  # no messages
    {"model": "base", "messages": []},
    {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    {"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
    {"model": 7, "messages": [{"role": "user", "content": "x"}]},
])
def test_bad_request(gw: str, user_key: str, body: dict[str, object]) -> None:
    r = httpx.post(gw + "/v1/chat/completions", json=body, headers=auth(user_key))
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_request_sdk_and_invalid_json(gw: str, user_key: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client(gw, user_key).chat.completions.create(model="base", messages=[])
    r = httpx.post(gw + "/v1/chat/completions", content=b"{not json", headers=auth(user_key))
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(gw + "/v1/chat/completions", content=b"[1]", headers=auth(user_key))
    assert r.status_code == 400


def test_rate_limit_error(gw: str, records: Records, redis_url: str) -> None:
    key = records.key("user", rpm=2)
    fresh_window(redis_url)
    c = client(gw, key)
    for _ in range(2):
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}])
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60


def test_generate_seed_contract(gw: str, user_key: str) -> None:
    r = httpx.post(gw + "/v1/generate", json={"prompt": "hello"}, headers=auth(user_key))
    assert r.status_code == 200
    data = r.json()
    assert data["text"] == f"r1|fake-base|{r.headers['x-request-id']}"
    assert data["tokens_generated"] == 3 and data["model"] == "base"
    assert data["latency_ms"] > 0 and data["request_id"] == r.headers["x-request-id"]
    # curl -d sends form encoding; the body is read as JSON anyway.
    r = httpx.post(gw + "/v1/generate", content=b'{"prompt": "x"}', headers={
        **auth(user_key), "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_generate_stream(gw: str, user_key: str) -> None:
    body = {"prompt": "hello", "stream": True}
    with httpx.stream("POST", gw + "/v1/generate", json=body, headers=auth(user_key)) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    deltas = [json.loads(e)["text"] for e in events[:-2]]
    assert "".join(deltas) == final["text"] and final["text"].startswith("r1|fake-base|")
    assert final["tokens_generated"] == 3


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": "x" * 1025}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": 1025}, {"prompt": "x", "temperature": 2.5}, {},
    {"prompt": 5},
])
def test_generate_validation(gw: str, user_key: str, body: dict[str, object]) -> None:
    r = httpx.post(gw + "/v1/generate", json=body, headers=auth(user_key))
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_path_and_method_are_openai_shaped(gw: str, user_key: str) -> None:
    r = httpx.get(gw + "/v1/nope", headers=auth(user_key))
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(gw + "/v1/chat/completions", headers=auth(user_key))
    assert r.status_code == 405 and "error" in r.json()


def test_metrics(gw: str, user_key: str, records: Records, redis_url: str) -> None:
    chat(gw, user_key, model="no-such-model-xyz")
    limited = records.key("user", rpm=1)
    fresh_window(redis_url)
    assert [chat(gw, limited).status_code for _ in range(2)] == [200, 429]
    assert "[DONE]" in chat(gw, user_key, stream=True).text
    text = httpx.get(gw + "/metrics").text
    assert 'tunegate_gateway_requests_total{model="base",route="/v1/chat/completions",' \
           'status="200"}' in text
    assert 'model="other",route="/v1/chat/completions",status="404"' in text
    assert "no-such-model-xyz" not in text
    assert 'tunegate_gateway_tokens_total{direction="out",model="base"}' in text
    assert "tunegate_gateway_time_to_first_token_seconds_bucket" in text
    assert 'tunegate_gateway_quota_rejections_total{limit="rpm"}' in text
