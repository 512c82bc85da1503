"""Point 3, uploads: ``/v1/files`` bodies stream into the artifact store (the local store here:
``<data_dir>/artifacts/files``) piece by piece; the size cap holds while streaming, and a body
over the cap or cut short leaves no object behind. Content reads come from the store; files of
the older layout (``<data_dir>/files``, an absolute path in their row) are still served."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shared.job_records import FileStore
from tests.gateway.conftest import Records, auth, gateway

CAP = 3 * 2**20  # TUNEGATE_GATEWAY_MAX_UPLOAD_BYTES for these tests
BOUNDARY = "tunegate-b0undary"


def lines(n: int) -> bytes:
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer {i}"}]}) + "\n" for i in range(n)).encode()


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path) -> Iterator[str]:
    with gateway(data_dir, [engine],
                 env={"TUNEGATE_GATEWAY_MAX_UPLOAD_BYTES": str(CAP)}) as url:
        yield url


def objects(data_dir: Path) -> list[Path]:
    """Uploaded files in the store, and anything in the older layout's folder (temporaries)."""
    found: list[Path] = []
    for folder in (data_dir / "artifacts" / "files", data_dir / "files"):
        found += sorted(folder.iterdir()) if folder.is_dir() else []
    return found


def wait_for(predicate, what: str, limit_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` holds (the server acts on its own time); fail after
    ``limit_s`` (a bound on waiting, not a speed assertion)."""
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def multipart_head(purpose: str = "fine-tune") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"{purpose}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"d.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


def test_openai_sdk_upload_lands_in_the_store(gw: str, data_dir: Path, records: Records) -> None:
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("admin"), max_retries=0)
    data = lines(2000)  # ~200 KB
    created = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert created.bytes == len(data) and created.filename == "train.jsonl"
    stored = data_dir / "artifacts" / "files" / f"{created.id}.jsonl"
    assert stored.read_bytes() == data
    assert not (data_dir / "files").exists()  # nothing in the older layout's folder
    assert FileStore(records.db).get(created.id)["path"] == f"files/{created.id}.jsonl"
    assert client.files.content(created.id).read() == data
    assert client.files.retrieve(created.id).bytes == len(data)


def test_refused_file_leaves_no_object(gw: str, data_dir: Path, records: Records) -> None:
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("admin"), max_retries=0)
    before = objects(data_dir)
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("bad.jsonl", lines(10) + b"not json\n" * 5000),
                            purpose="fine-tune")
    # Counted in full, though only the first issues are kept (memory bounded by the file's size).
    assert bad.value.body["message"].startswith("5000 of 5010 lines invalid")  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("ok.jsonl", lines(10)), purpose="assistants")
    assert err.value.body["param"] == "purpose"  # type: ignore[index]
    assert objects(data_dir) == before


def test_over_cap_stream_is_413_and_its_partial_object_is_removed(
        gw: str, data_dir: Path, records: Records) -> None:
    before = objects(data_dir)

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it up front
        yield multipart_head()
        piece = lines(700)  # ~70 KB of valid lines
        for _ in range(2 * CAP // len(piece)):
            yield piece
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    r = httpx.post(gw + "/v1/files", content=body(), timeout=60, headers={
        **auth(records.key("admin")), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert objects(data_dir) == before


def test_client_gone_midway_leaves_no_object(gw: str, data_dir: Path, records: Records) -> None:
    before = objects(data_dir)
    host, port = gw.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {records.key('admin')}\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                   f"Content-Length: {CAP - 1}\r\n\r\n").encode() + multipart_head())
        sent = 0
        while sent < 2 * 2**20:  # past the first piece written to the store
            s.sendall(lines(700))
            sent += len(lines(700))
        wait_for(lambda: len(objects(data_dir)) > len(before), "the upload's object appears")
    wait_for(lambda: objects(data_dir) == before, "the partial object is removed")


def test_files_of_the_older_layout_are_still_read(gw: str, data_dir: Path,
                                                 records: Records) -> None:
    legacy = data_dir / "files" / "file-legacy0001.jsonl"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(lines(3))
    FileStore(records.db).add(id="file-legacy0001", filename="old.jsonl", purpose="fine-tune",
                              bytes=legacy.stat().st_size, sha256="", path=str(legacy),
                              report=None)
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("admin"), max_retries=0)
    assert client.files.content("file-legacy0001").read() == lines(3)
    legacy.unlink()
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-legacy0001")


def test_uploaded_files_cannot_become_an_adapter(gw: str, data_dir: Path,
                                                  records: Records) -> None:
    """``files/`` is the uploads' folder of the store: registering it (or a folder in it) as an
    adapter version would move every uploaded file away."""
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("admin"), max_retries=0)
    client.files.create(file=("a.jsonl", lines(5)), purpose="fine-tune")
    before = objects(data_dir)
    for path in ("files", "files/", "./files"):
        r = httpx.post(f"{gw}/admin/adapters/stolen/versions", headers=auth(records.key("admin")),
                       json={"path": path}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
    assert objects(data_dir) == before
