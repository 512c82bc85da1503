"""Labelled traffic as training and golden records (SQLite), and ``tunegate traffic export``."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.data import validate_file
from shared.db import Database, database_url
from shared.errors import InvalidRequest
from shared.traffic_datasets import parse_model, traffic_data
from shared.traffic_records import TrafficSample

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
N = [0]


def chat_row(content: str, *, minutes: int = 0, **kw: Any) -> TrafficSample:
    N[0] += 1
    fields: dict[str, Any] = {
        "request_id": f"r{N[0]}", "route": "/v1/chat/completions", "model": "sent",
        "name": "sent", "version": 1, "lane": "stable", "output": "served", "status": 200,
        "latency_ms": 1.0, "key_id": "key_a", "created_at": T0 + dt.timedelta(minutes=minutes),
        "request": {"model": "sent", "messages": [
            {"role": "system", "content": "Classify."}, {"role": "user", "content": content}]}}
    if "label" in kw or "corrected_output" in kw:  # given by a key that may label
        fields.update(feedback_key_id="key_admin", feedback_trusted=True)
    return TrafficSample(**{**fields, **kw})


@pytest.fixture
def db(tmp_path: Path) -> Database:
    db = Database(database_url(tmp_path))
    with db.session() as s:
        s.add_all([
            chat_row("good movie", label="fresh"),
            chat_row("bad movie", corrected_output="rotten", label="fresh", minutes=1),
            chat_row("good movie", label="rotten", minutes=2),  # same prompt, later feedback
            chat_row("unlabelled", minutes=3),
            chat_row("shadow copy", lane="shadow", label="fresh", minutes=4),
            chat_row("failed", status=502, label="fresh", minutes=5),
            chat_row("other version", version=2, label="fresh", minutes=6),
            chat_row("old", label="fresh", minutes=-60),
            chat_row("parts", label="fresh", minutes=7, request={"messages": [
                {"role": "user", "content": [{"type": "text", "text": "x"}]}]}),
            chat_row("long", corrected_output="y" * 600, minutes=8),
            chat_row("x", route="/v1/completions", label="fresh", minutes=9,
                     request={"prompt": "Complete: good"}),
            chat_row("base one", name="base", version=None, lane="base", label="ok",
                     minutes=10),
        ])
    return db


def test_labelled_records(db: Database) -> None:
    data = traffic_data(db, "sent", T0)
    assert data.records == [
        {"messages": [{"role": "system", "content": "Classify."},
                      {"role": "user", "content": "good movie"},
                      {"role": "assistant", "content": "rotten"}]},  # the latest label wins
        {"messages": [{"role": "system", "content": "Classify."},
                      {"role": "user", "content": "bad movie"},
                      {"role": "assistant", "content": "rotten"}]},  # corrected_output first
        {"messages": [{"role": "system", "content": "Classify."},
                      {"role": "user", "content": "other version"},
                      {"role": "assistant", "content": "fresh"}]},
        {"instruction": "Complete: good", "output": "fresh"},
    ]
    # Samples matched: 7 (not the shadow, failed, old, unlabelled ones); "parts" cannot be a
    # record and "long" is over the 512-character answer limit.
    assert data.summary() == {"records": 4, "samples": 7, "skipped": 2, "duplicates": 1}


def test_filters(db: Database) -> None:
    v2 = traffic_data(db, "sent@v2", T0)
    assert [r["messages"][1]["content"] for r in v2.records] == ["other version"]
    until = traffic_data(db, "sent", T0, T0 + dt.timedelta(minutes=1, seconds=30))
    assert len(until.records) == 2
    assert len(traffic_data(db, "sent", T0 - dt.timedelta(hours=2)).records) == 5
    assert traffic_data(db, "base", T0).records[0]["messages"][-1]["content"] == "ok"
    everything = traffic_data(db, "sent", T0, labelled=False)
    served = [r for r in everything.records if r.get("messages", [{}])[-1].get("content")
              == "served"]
    assert len(served) == 1  # the unlabelled sample, with the answer that was served
    exclude = traffic_data(db, "sent", T0).records[:1]
    from shared.traffic_datasets import record_key

    assert len(traffic_data(db, "sent", T0, exclude={record_key(exclude[0])}).records) == 3
    with pytest.raises(InvalidRequest):
        parse_model("no spaces allowed")
    assert parse_model("sent@v3") == ("sent", 3) and parse_model("base") == ("base", None)


def test_cli_export(db: Database, tmp_path: Path) -> None:
    out = tmp_path / "golden.jsonl"
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(tmp_path), "TUNEGATE_DATABASE_URL": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate", "traffic", "export", "--model", "sent", "--since",
         "2026-03-01T12:00", "--labelled", str(out)], env=env, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["records"] == 4
    report = validate_file(out)  # a valid golden/training file, as uploads are checked
    assert report.accepted and len(report.examples) == 4 and not report.issues
    bad = subprocess.run(
        [sys.executable, "-m", "tunegate", "traffic", "export", "--model", "sent", "--since",
         "yesterday", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
