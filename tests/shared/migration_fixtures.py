"""The databases the migration tests start from: an empty one (a fresh schema on the PostgreSQL
server at 127.0.0.1:5432), and one as the code made it before migrations (revision 0001's tables,
frozen) or as the first release made it, filled with rows of every table."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.auth import hash_key
from shared import migrate
from shared.db import database_url
from tests.shared.test_db import PG_URL, _pg_up

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
SECRET = "tg-previous-schema-key"
# Tables that the first release did not have yet (added by create_all at a later start).
LATER_TABLES = {"traffic_samples", "promotions", "promotion_events", "eval_runs", "engine_replicas"}
# api_keys as the first release made it: no sample_rate (added later by hand-built ALTER TABLE).
FIRST_RELEASE_API_KEYS = (
    "CREATE TABLE api_keys (id VARCHAR(40) NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL, "
    "scope VARCHAR(16) NOT NULL, key_hash VARCHAR(64) NOT NULL UNIQUE, prefix VARCHAR(16) NOT "
    "NULL, models JSON, rpm INTEGER, tpm INTEGER, created_at TIMESTAMP WITH TIME ZONE NOT NULL, "
    "revoked_at TIMESTAMP WITH TIME ZONE)"
)


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """The URL of a fresh schema on the PostgreSQL server, dropped afterwards."""
    if not _pg_up():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    base = database_url(Path("."), PG_URL)
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(base)
    with admin.begin() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield base + f"?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _rows(n: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Rows for every table of the previous schema (revision 0001's columns)."""
    at = [T0 + dt.timedelta(minutes=i) for i in range(n)]
    return {
        "api_keys": [
            dict(
                id=f"key-{i}",
                name=f"k{i}",
                scope="admin" if i == 0 else "user",
                key_hash=hash_key(SECRET) if i == 0 else f"{i:064d}",
                prefix="tg-pre",
                models=["base", f"m{i}"] if i else None,
                rpm=60 * i or None,
                tpm=None,
                sample_rate=0.5 if i == 1 else None,
                created_at=at[i],
                revoked_at=at[i] if i == 2 else None,
            )
            for i in range(n)
        ],
        "adapters": [dict(name="sent", created_at=T0)],
        "adapter_versions": [
            dict(
                id=i + 1,
                name="sent",
                version=i + 1,
                content_hash=f"{i:064x}",
                artifact=f"sent/v{i + 1}",
                manifest={"rank": 8, "i": i},
                created_at=at[i],
            )
            for i in range(n)
        ],
        "aliases": [
            dict(name="sent", alias="stable", version=2, updated_at=at[1]),
            dict(name="sent", alias="latest", version=3, updated_at=at[2]),
        ],
        "alias_events": [
            dict(
                id=i + 1,
                name="sent",
                alias="stable",
                from_version=i or None,
                to_version=i + 1,
                kind="set",
                reason=None,
                at=at[i],
            )
            for i in range(2)
        ],
        "fine_tuning_jobs": [
            dict(
                id=f"ftjob-{i}",
                status="succeeded",
                model="base",
                name="sent",
                spec={"epochs": i},
                fine_tuned_model=f"sent@v{i + 1}",
                error=None,
                result={"score": 0.9},
                trained_tokens=100 * i,
                created_at=at[i],
                started_at=at[i],
                finished_at=at[i],
                heartbeat_at=None,
            )
            for i in range(n)
        ],
        "fine_tuning_events": [
            dict(
                id=i + 1,
                job_id=f"ftjob-{i % n}",
                created_at=at[i % n],
                level="info",
                type="message",
                message=f"step {i}",
                data={"loss": 1.0 / (i + 1)},
            )
            for i in range(2 * n)
        ],
        "files": [
            dict(
                id="file-1",
                filename="train.jsonl",
                purpose="fine-tune",
                bytes=10,
                sha256="0" * 64,
                path="files/file-1",
                report=None,
                created_at=T0,
            )
        ],
        "engine_replicas": [
            dict(url="http://127.0.0.1:9", kind="embedded", registered_at=T0, last_seen=T0)
        ],
        "promotions": [
            dict(
                id=1,
                name="sent",
                version=3,
                baseline=2,
                state="canary",
                shadow_fraction=0.1,
                canary_weight=0.1,
                created_at=T0,
                state_since=T0,
            )
        ],
        "promotion_events": [
            dict(
                id=1,
                promotion_id=1,
                name="sent",
                version=3,
                from_state=None,
                to_state="shadow",
                actor="monitor",
                reason="started",
                metrics={},
                at=T0,
            )
        ],
        "eval_runs": [
            dict(
                id=1,
                name="sent",
                version=3,
                kind="quality",
                n=5,
                score=0.8,
                metrics={"n": 5},
                window_start=T0,
                created_at=T0,
            )
        ],
        "traffic_samples": [
            dict(
                id=i + 1,
                request_id=f"req-{i}",
                trace_id=None,
                key_id="key-1",
                route="/v1/chat/completions",
                model="sent",
                name="sent",
                version=2,
                lane="live",
                request={"messages": []},
                output="ok",
                status=200,
                latency_ms=12.5,
                ttft_ms=None,
                created_at=at[i],
                label="positive" if i == 0 else None,
                score=None,
                corrected_output=None,
                feedback_at=None,
            )
            for i in range(n)
        ],
    }


def previous_database(url: str, *, first_release: bool = False) -> dict[str, list[dict]]:
    """A database as today's code made it before migrations (revision 0001's tables, frozen),
    filled; ``first_release``: as the first release made it (no sample_rate, fewer tables)."""
    frozen = migrate.first_schema()
    engine = sa.create_engine(url)
    rows = _rows()
    with engine.begin() as conn:
        if first_release:
            ddl = FIRST_RELEASE_API_KEYS
            if engine.dialect.name == "sqlite":
                ddl = ddl.replace("TIMESTAMP WITH TIME ZONE", "DATETIME")
            conn.execute(sa.text(ddl))
            tables = [
                t
                for t in frozen.sorted_tables
                if t.name not in LATER_TABLES and t.name != "api_keys"
            ]
            frozen.create_all(conn, tables=tables)
            for r in rows["api_keys"]:
                r.pop("sample_rate")
            rows = {k: v for k, v in rows.items() if k not in LATER_TABLES}
        else:
            frozen.create_all(conn)
        for table in frozen.sorted_tables:
            if table.name in rows:
                conn.execute(sa.insert(table), rows[table.name])
                serial = "id" in table.c and isinstance(table.c.id.type, sa.Integer)
                if engine.dialect.name == "postgresql" and serial and rows[table.name]:
                    # Rows carry their ids: move each serial past them, as inserts through
                    # the code would have, so that new rows get fresh ids.
                    conn.execute(sa.text(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                        f"(SELECT max(id) FROM {table.name}))"
                    ))
    engine.dispose()
    return snapshot(url, rows)


def snapshot(url: str, tables: dict[str, Any]) -> dict[str, list[dict]]:
    """Every row of ``tables``, as read back (only the columns the previous schema had)."""
    frozen = migrate.first_schema()
    engine = sa.create_engine(url)
    out = {}
    with engine.connect() as conn:
        for name, rows in tables.items():
            table = frozen.tables[name]
            cols = [table.c[c] for c in (rows[0] if rows else {})] or list(table.c)
            pk = list(table.primary_key.columns)
            out[name] = [dict(r._mapping) for r in conn.execute(sa.select(*cols).order_by(*pk))]
    engine.dispose()
    return out
