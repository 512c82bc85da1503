"""Streaming failure modes: upstream breaks mid-stream; client disconnects."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import Records, auth, fake_replica, gateway


@pytest.fixture(scope="module")
def setup(data_dir: Path) -> Iterator[tuple[str, str]]:
    with fake_replica("r1") as (engine, _), gateway(data_dir, [engine]) as gw:
        yield gw, engine


def body(content: str) -> dict[str, object]:
    return {"model": "base", "stream": True, "messages": [{"role": "user", "content": content}]}


def test_upstream_failure_mid_stream_ends_with_an_error_event(setup, records: Records) -> None:  # type: ignore[no-untyped-def]
    gw, _ = setup
    key = records.key("user")
    with httpx.stream("POST", gw + "/v1/chat/completions", json=body("FAIL_MIDSTREAM"),
                      headers=auth(key), timeout=30) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "upstream_error" and err["message"]
    assert len(events) >= 4  # the chunks before the failure were passed on
    c = openai.OpenAI(base_url=gw + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIError):
        list(c.chat.completions.create(model="base", stream=True,
                                       messages=[{"role": "user", "content": "FAIL_MIDSTREAM"}]))


def test_client_disconnect_aborts_the_upstream(setup, records: Records) -> None:  # type: ignore[no-untyped-def]
    gw, engine = setup
    key = records.key("user")
    before = httpx.get(engine + "/fake/stats").json()["aborted_streams"]
    with httpx.stream("POST", gw + "/v1/chat/completions", json=body("SLOW"),
                      headers=auth(key), timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up (the fake would send 100, 0.1 s apart)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(engine + "/fake/stats").json()["aborted_streams"] > before:
            break
        time.sleep(0.1)
    assert httpx.get(engine + "/fake/stats").json()["aborted_streams"] == before + 1
