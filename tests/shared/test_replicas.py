"""Registered replicas in SQL (shared.replicas): canonical URLs and idempotent registration."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.db import Database, database_url
from shared.errors import InvalidRequest
from shared.replicas import ReplicaStore, replica_url


@pytest.mark.parametrize(("raw", "canonical"), [
    ("http://127.0.0.1:8001/", "http://127.0.0.1:8001"),
    ("HTTP://Engine-0.Example:8000", "http://engine-0.example:8000"),
    ("https://engine.example/prefix/", "https://engine.example/prefix"),
    ("http://[::1]:8001", "http://[::1]:8001"),
])
def test_canonical_urls(raw: str, canonical: str) -> None:
    assert replica_url(raw) == canonical


def test_bad_url_names_the_param() -> None:
    with pytest.raises(InvalidRequest) as err:
        replica_url("ftp://x:1")
    assert err.value.param == "url" and err.value.status == 400


def test_register_is_idempotent(tmp_path: Path) -> None:
    store = ReplicaStore(Database(database_url(tmp_path)))
    first, created = store.register("http://127.0.0.1:9001", "vllm")
    assert created
    again, created = store.register("http://127.0.0.1:9001")
    assert not created and again.kind == "vllm" and again.last_seen >= first.last_seen
    assert again.registered_at == first.registered_at
    store.register("http://127.0.0.1:9002", "embedded")
    assert store.urls() == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert store.deregister("http://127.0.0.1:9001")
    assert not store.deregister("http://127.0.0.1:9001")
    assert [r.url for r in store.records()] == ["http://127.0.0.1:9002"]
