"""Point 3: no key, no body. Every route authenticates from the headers before a byte of the body
is read; bodies are capped (small for JSON, a configurable limit for uploads) with a 413 in
OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Records, auth, gateway
from tests.security.conftest import head_only

UPLOAD_CAP = 200_000  # bytes, TUNEGATE_GATEWAY_MAX_UPLOAD_BYTES for these tests


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path) -> Iterator[str]:
    with gateway(data_dir, [engine],
                 env={"TUNEGATE_GATEWAY_MAX_UPLOAD_BYTES": str(UPLOAD_CAP)}) as url:
        yield url


@pytest.mark.parametrize("path", ["/admin/keys", "/v1/files", "/v1/chat/completions",
                                  "/v1/feedback", "/v1/generate", "/no/such/route"])
def test_anonymous_bodies_are_refused_before_they_are_read(gw: str, path: str) -> None:
    # 60 MB announced, nothing sent: the answer must come from the headers alone.
    ctype = ("multipart/form-data; boundary=b0undary" if path == "/v1/files"
             else "application/json")
    status, body = head_only(gw, "POST", path, {"Content-Type": ctype,
                                                "Content-Length": str(60 * 2**20)})
    assert status == 401
    err = json.loads(body)["error"]
    assert err["type"] == "authentication_error" and set(err) == {"message", "type", "param",
                                                                  "code"}
    status, _ = head_only(gw, "POST", path, {"Authorization": "Bearer tg-not-a-key-at-all-x",
                                             "Content-Length": str(60 * 2**20)})
    assert status == 401


def test_oversized_json_is_413_before_it_is_read(gw: str, records: Records) -> None:
    user = records.key("user")
    status, body = head_only(gw, "POST", "/v1/chat/completions",
                             {**auth(user), "Content-Type": "application/json",
                              "Content-Length": str(3 * 2**20)})
    assert status == 413
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"


def test_oversized_chunked_json_is_413(gw: str, records: Records) -> None:
    user = records.key("user")

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all, no Content-Length
        yield b'"}]}'

    r = httpx.post(gw + "/v1/chat/completions", headers=auth(user), content=chunks(), timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_upload_cap(gw: str, records: Records) -> None:
    admin, user = records.key("admin"), records.key("user")
    def lines(n: int) -> bytes:
        return "".join(json.dumps({"messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"}]}) + "\n" for i in range(n)).encode()

    small = lines(50)
    r = httpx.post(gw + "/v1/files", headers=auth(admin), timeout=30,
                   files={"file": ("d.jsonl", small)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == len(small)
    big = lines(UPLOAD_CAP // 80 + 100)
    assert len(big) > UPLOAD_CAP
    r = httpx.post(gw + "/v1/files", headers=auth(admin), timeout=30,
                   files={"file": ("d.jsonl", big)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A user key gets the JSON cap on the upload route (then its 403), not the upload cap.
    status, _ = head_only(gw, "POST", "/v1/files", {**auth(user),
                                                    "Content-Length": str(80 * 2**20)})
    assert status == 413
