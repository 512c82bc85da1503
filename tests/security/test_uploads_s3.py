"""Uploads on an S3-compatible store (a real moto server): the file streams into the bucket as
the object ``files/<id>.jsonl``, its content is read back from there, the trainer downloads it
before reading, and a body over the cap leaves no object in the bucket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shared.artifact_store import ArtifactStore
from shared.job_spec import TrainSpec
from tests.gateway.conftest import Records, auth, gateway
from tests.security.test_uploads import BOUNDARY, lines, multipart_head
from tests.shared.test_registry_s3 import s3_endpoint  # noqa: F401 (fixture)
from trainer.job_files import fetch_inputs

s3fs = pytest.importorskip("s3fs")
CAP = 7 * 2**20  # over s3fs' 5 MiB block: the over-cap body starts a multipart upload


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> tuple[str, dict[str, str]]:  # noqa: F811
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("tunegate-uploads")
    return "s3://tunegate-uploads/store", options


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path, bucket: tuple[str, dict[str, str]]) -> Iterator[str]:
    url, options = bucket
    with gateway(data_dir, [engine], env={
            "TUNEGATE_ARTIFACT_STORE": url,
            "TUNEGATE_ARTIFACT_STORE_OPTIONS": json.dumps(options),
            "TUNEGATE_GATEWAY_MAX_UPLOAD_BYTES": str(CAP)}) as base:
        yield base


def test_upload_read_and_train_from_s3(gw: str, data_dir: Path, records: Records,
                                       bucket: tuple[str, dict[str, str]],
                                       tmp_path: Path) -> None:
    store = ArtifactStore(*bucket)
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("admin"), max_retries=0)
    data = lines(20_000)  # ~2 MB: more than one piece
    created = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert store.fs.cat(store.path(f"files/{created.id}.jsonl")) == data
    assert not (data_dir / "files").exists() and not (data_dir / "artifacts" / "files").exists()
    assert client.files.content(created.id).read() == data
    # What a job's spec names (the object's URL) is downloaded by the trainer before reading.
    spec = TrainSpec(job_id="ftjob-s3", name="s3", base_model="m",
                     training_file=store.public_path(f"files/{created.id}.jsonl"))
    local = fetch_inputs(spec, store, tmp_path).training_file
    assert Path(local).read_bytes() == data


def test_over_cap_leaves_nothing_in_the_bucket(gw: str, records: Records,
                                               bucket: tuple[str, dict[str, str]]) -> None:
    store = ArtifactStore(*bucket)
    store.fs.invalidate_cache()
    before = set(store.fs.find(store.path("files")))

    def body() -> Iterator[bytes]:
        yield multipart_head()
        piece = lines(700)
        for _ in range(2 * CAP // len(piece)):
            yield piece
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    r = httpx.post(gw + "/v1/files", content=body(), timeout=60, headers={
        **auth(records.key("admin")), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 413, r.text
    store.fs.invalidate_cache()
    assert set(store.fs.find(store.path("files"))) == before
    listed = store.fs.call_s3("list_multipart_uploads", Bucket="tunegate-uploads")
    assert not listed.get("Uploads")  # no unfinished multipart upload left behind
