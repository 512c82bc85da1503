"""A fine-tuning job whose data is a base file plus "labelled traffic of model M since T", through
a real gateway process (real Redis queue, nobody consuming it: the test reads what was queued)."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.data import validate_file
from shared.job_records import FileStore, JobStore
from shared.traffic_records import TrafficSample
from tests.gateway.conftest import Records, auth, fake_replica, gateway

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def system(data_dir: Path, redis_url: str, records: Records) -> Iterator[dict[str, Any]]:
    base = data_dir / "models" / "tiny"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")  # the job is never run: only its data is checked
    with records.db.session() as s:
        for i, (text, label) in enumerate([("good", "fresh"), ("bad", "rotten"),
                                           ("meh", None), ("base dup", "fresh")]):
            s.add(TrafficSample(
                request_id=f"q{i}", key_id="key_x", route="/v1/chat/completions", model="sent",
                name="sent", version=1, lane="stable", output="fresh", status=200,
                latency_ms=1.0, label=label, created_at=NOW - dt.timedelta(minutes=5),
                # labelled by a key that may label: only such labels become training data
                feedback_key_id="key_admin" if label else None, feedback_trusted=bool(label),
                request={"messages": [{"role": "user", "content": text}]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEGATE_TRAINER_QUEUE_NAME", f"tunegate:test:{secrets.token_hex(4)}")
        with fake_replica("r1") as (engine, _), gateway(data_dir, [engine], redis_url) as url:
            key = records.key("admin")
            lines: list[dict[str, Any]] = [{"instruction": f"Say {i}", "output": str(i)}
                                           for i in range(20)]
            lines.append({"messages": [{"role": "user", "content": "base dup"},
                                       {"role": "assistant", "content": "fresh"}]})
            up = httpx.post(f"{url}/v1/files", headers=auth(key), data={"purpose": "fine-tune"},
                            files={"file": ("base.jsonl",
                                            "\n".join(json.dumps(x) for x in lines) + "\n")})
            assert up.status_code == 200, up.text
            yield {"url": url, "key": key, "file": up.json()["id"], "records": records}


def create(system: dict[str, Any], **extra: Any) -> httpx.Response:
    return httpx.post(f"{system['url']}/v1/fine_tuning/jobs", headers=auth(system["key"]),
                      timeout=30, json={"model": "tiny", "training_file": system["file"],
                                        "suffix": "sent", **extra})


def test_job_trains_on_base_file_plus_labelled_traffic(system: dict[str, Any]) -> None:
    since = (NOW - dt.timedelta(hours=1)).isoformat()
    resp = create(system, traffic={"model": "sent", "since": since})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    traffic = job["tunegate"]["traffic"]
    # Two labelled samples become records; the third labelled one repeats a base-file line.
    assert (traffic["records"], traffic["samples"], traffic["duplicates"]) == (2, 3, 1)
    assert job["training_file"] == system["file"]  # the file the client named
    db = system["records"].db
    spec = JobStore(db).get(job["id"])["spec"]  # type: ignore[index]
    merged = FileStore(db).get(traffic["merged_file_id"])
    # The merged file is an object of the (local) artifact store; the spec names its path.
    stored = system["records"].registry.store.path(merged["path"]) if merged else None
    assert merged is not None and spec["training_file"] == stored
    report = validate_file(stored)
    assert report.accepted and len(report.examples) == 23 and not report.issues
    assert report.examples[-1].messages == [{"role": "user", "content": "bad"},
                                            {"role": "assistant", "content": "rotten"}]


def test_no_labelled_traffic_is_a_400(system: dict[str, Any]) -> None:
    resp = create(system, traffic={"model": "sent", "since": NOW.isoformat()})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "no_traffic_data" and err["param"] == "traffic"
    bad = create(system, traffic={"model": "sent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "traffic.since"
