"""Registry race: real processes register versions of one name at the same moment, on SQLite and
on PostgreSQL. Every registration gets its own number, every row points at a complete folder
whose content hash is the row's, and nothing is renamed aside (``.orphan``). A job the stale-job
sweep failed never registers."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from shared.artifact_store import MANIFEST_FILE
from shared.db import AdapterVersion, Database, database_url
from shared.job_records import FineTuningJob, JobStore
from shared.registry import Registry
from tests.shared.test_db import PG_URL, _pg_up

PROCS = 4
EACH = 6  # registrations per process


def _register_many(url: str, store: str, tag: str, start: Any, out: Any) -> None:
    """One process: wait for the others, then register EACH distinct folders."""
    db = Database(url, create=False)
    reg = Registry(db, store)
    start.wait()
    done = []
    for i in range(EACH):
        rel = f"staging/{tag}-{i}"
        folder = Path(store) / rel
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text(f"{tag} {i} {uuid.uuid4().hex}")
        (folder / "adapter_config.json").write_text("{}")
        done.append(reg.register_version("racer", rel, {"tag": tag, "i": i}).version)
    db.dispose()
    out.put(done)


def _race(url: str, store: Path) -> list[int]:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: real separate processes
    start, out = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=_register_many, args=(url, str(store), f"p{k}", start, out))
             for k in range(PROCS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [v for r in results for v in r]


def _check(db: Database, store: Path, versions: list[int]) -> None:
    assert len(versions) == len(set(versions)) == PROCS * EACH  # one number per registration
    reg = Registry(db, str(store))
    with db.session() as s:
        rows = list(s.scalars(select(AdapterVersion).where(AdapterVersion.name == "racer")))
    assert sorted(r.version for r in rows) == sorted(versions)
    for r in rows:
        folder = store / r.artifact
        assert (folder / MANIFEST_FILE).is_file(), f"{r.artifact} is missing or incomplete"
        assert reg.store.content_hash(r.artifact) == r.content_hash
    leftovers = [p.name for p in (store / "adapters" / "racer").iterdir()
                 if not p.name.startswith("v") or ".orphan" in p.name]
    assert leftovers == []
    assert not any((store / "staging").iterdir())  # every staged folder was moved into place


def test_concurrent_registrations_on_sqlite(tmp_path: Path) -> None:
    url = database_url(tmp_path)
    Database(url).dispose()  # tables made once, before the race
    store = tmp_path / "artifacts"
    versions = _race(url, store)
    _check(Database(url), store, versions)


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not _pg_up():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = Database(database_url(Path("."), PG_URL), create=False)
    with admin.engine.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    url = database_url(Path("."), PG_URL) + f"?options=-csearch_path%3D{schema}"
    Database(url, auto_migrate=True).dispose()
    yield url
    with admin.engine.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_concurrent_registrations_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    store = tmp_path / "artifacts"
    versions = _race(pg_url, store)
    _check(Database(pg_url, create=False), store, versions)


def test_a_job_failed_by_the_sweep_never_registers(tmp_path: Path) -> None:
    db = Database(database_url(tmp_path))
    store = JobStore(db)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for job_id in ("ftjob-lost", "ftjob-alive"):
        store.create(job_id, model="m", name="n", spec={}, status="running")
        with db.session() as s:
            s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                      .values(heartbeat_at=old))
    # The worker of "alive" claims its job (about to register) just before the sweep writes.
    assert store.claim("ftjob-alive")
    assert store.fail_stale(60.0) == ["ftjob-lost"]
    lost, alive = store.get("ftjob-lost"), store.get("ftjob-alive")
    assert lost is not None and lost["status"] == "failed"
    assert alive is not None and alive["status"] == "running"
    # The worker of "lost" was only slow: its claim fails, so it does not register.
    assert not store.claim("ftjob-lost")
    db.dispose()
