"""The schema as create_all made it before migrations existed (plus api_keys.sample_rate, the one
column an earlier release added by hand).

Revision ID: 0001
Revises:
Create Date: 2026-12-02

Frozen here, independent of the models: ``schema()`` is also what adoption compares databases
made before migrations with (``shared.migrate``). Timestamps are ``DateTime(timezone=True)``,
the storage type of ``shared.db.UTCDateTime``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from alembic.operations import ops

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _str(name: str, length: int, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def _int(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=nullable)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def schema() -> sa.MetaData:
    meta = sa.MetaData()
    sa.Table(
        "api_keys",
        meta,
        _str("id", 40),
        _str("name", 200),
        _str("scope", 16),
        _str("key_hash", 64),
        _str("prefix", 16),
        sa.Column("models", sa.JSON(), nullable=True),
        _int("rpm", True),
        _int("tpm", True),
        sa.Column("sample_rate", sa.Float(), nullable=True),
        _ts("created_at"),
        _ts("revoked_at", True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    sa.Table("adapters", meta, _str("name", 64), _ts("created_at"), sa.PrimaryKeyConstraint("name"))
    sa.Table(
        "adapter_versions",
        meta,
        _id(),
        _str("name", 64),
        _int("version"),
        _str("content_hash", 64),
        _str("artifact", 500),
        sa.Column("manifest", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["name"], ["adapters.name"]),
        sa.UniqueConstraint("name", "version"),
        sa.Index("ix_adapter_versions_hash", "name", "content_hash"),
    )
    sa.Table(
        "aliases",
        meta,
        _str("name", 64),
        _str("alias", 32),
        _int("version"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["name"], ["adapters.name"]),
        sa.PrimaryKeyConstraint("name", "alias"),
    )
    sa.Table(
        "alias_events",
        meta,
        _id(),
        _str("name", 64),
        _str("alias", 32),
        _int("from_version", True),
        _int("to_version"),
        _str("kind", 16),
        _str("reason", 500, True),
        _ts("at"),
        sa.Index("ix_alias_events_name_alias", "name", "alias", "id"),
    )
    sa.Table(
        "engine_replicas",
        meta,
        _str("url", 500),
        _str("kind", 32, True),
        _ts("registered_at"),
        _ts("last_seen"),
        sa.PrimaryKeyConstraint("url"),
    )
    sa.Table(
        "promotions",
        meta,
        _id(),
        _str("name", 64),
        _int("version"),
        _int("baseline", True),
        _str("state", 16),
        sa.Column("shadow_fraction", sa.Float(), nullable=False),
        sa.Column("canary_weight", sa.Float(), nullable=False),
        _ts("created_at"),
        _ts("state_since"),
        sa.Index("ix_promotions_name_state", "name", "state"),
    )
    sa.Table(
        "promotion_events",
        meta,
        _id(),
        _int("promotion_id"),
        _str("name", 64),
        _int("version"),
        _str("from_state", 16, True),
        _str("to_state", 16),
        _str("actor", 100),
        _str("reason", 500),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _ts("at"),
        sa.ForeignKeyConstraint(["promotion_id"], ["promotions.id"]),
        sa.Index("ix_promotion_events_name", "name", "id"),
    )
    sa.Table(
        "eval_runs",
        meta,
        _id(),
        _str("name", 64),
        _int("version"),
        _str("kind", 16),
        _int("n"),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _ts("window_start", True),
        _ts("created_at"),
        sa.Index("ix_eval_runs_version", "name", "version", "kind", "id"),
    )
    sa.Table(
        "traffic_samples",
        meta,
        _id(),
        _str("request_id", 64),
        _str("trace_id", 32, True),
        _str("key_id", 40, True),
        _str("route", 40),
        _str("model", 200),
        _str("name", 64),
        _int("version", True),
        _str("lane", 16),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        _int("status"),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        _ts("created_at"),
        _str("label", 200, True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("corrected_output", sa.Text(), nullable=True),
        _ts("feedback_at", True),
        sa.UniqueConstraint("request_id", "lane"),
        sa.Index("ix_traffic_samples_key", "key_id", "created_at"),
        sa.Index("ix_traffic_samples_version", "name", "version", "created_at"),
    )
    sa.Table(
        "fine_tuning_jobs",
        meta,
        _str("id", 64),
        _str("status", 24),
        _str("model", 200),
        _str("name", 64),
        sa.Column("spec", sa.JSON(), nullable=False),
        _str("fine_tuned_model", 200, True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        _int("trained_tokens", True),
        _ts("created_at"),
        _ts("started_at", True),
        _ts("finished_at", True),
        _ts("heartbeat_at", True),
        sa.PrimaryKeyConstraint("id"),
        sa.Index("ix_fine_tuning_jobs_status", "status"),
    )
    sa.Table(
        "fine_tuning_events",
        meta,
        _id(),
        _str("job_id", 64),
        _ts("created_at"),
        _str("level", 8),
        _str("type", 16),
        _str("message", 2000),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["fine_tuning_jobs.id"]),
        sa.Index("ix_fine_tuning_events_job", "job_id", "id"),
    )
    sa.Table(
        "files",
        meta,
        _str("id", 64),
        _str("filename", 500),
        _str("purpose", 32),
        _int("bytes"),
        _str("sha256", 64),
        _str("path", 1000),
        sa.Column("report", sa.JSON(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    return meta


def upgrade() -> None:
    for table in schema().sorted_tables:  # parents before children (foreign keys)
        op.invoke(ops.CreateTableOp.from_table(table))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            op.invoke(ops.CreateIndexOp.from_index(index))


def downgrade() -> None:
    for table in reversed(schema().sorted_tables):
        op.drop_table(table.name)
