"""Named unique constraints (one version number per adapter name, one key per hash, one sample
per request and lane), a range check on api_keys.sample_rate, and indexes for the hot lookups:
traffic by time and by adapter over time, fine-tuning jobs newest first.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

The unique constraints existed unnamed (PostgreSQL called them ``<table>_<columns>_key``, SQLite
nothing); named, a later revision can drop or change them on every backend, and code can tell
which one a conflict hit. Expand only: code of revision 0001 runs on this schema unchanged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The models' naming convention (shared.db.NAMING_CONVENTION), frozen.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}
UNIQUES = {  # table: columns
    "api_keys": ["key_hash"],
    "adapter_versions": ["name", "version"],
    "traffic_samples": ["request_id", "lane"],
}
SAMPLE_RATE_CHECK = "sample_rate IS NULL OR (sample_rate >= 0 AND sample_rate <= 1)"
INDEXES = [  # name, table, columns
    ("ix_traffic_samples_created_at", "traffic_samples", ["created_at"]),
    ("ix_traffic_samples_name_time", "traffic_samples", ["name", "created_at"]),
    ("ix_fine_tuning_jobs_created", "fine_tuning_jobs", ["created_at", "id"]),
]


def _unique(table: str, columns: list[str]) -> tuple[bool, str | None]:
    """Whether the table has a unique constraint on ``columns`` that reflection sees, and its
    name (None: unnamed, as SQLite reflects ``UNIQUE (a, b)``)."""
    if op.get_context().as_sql:  # `--sql` prints DDL without a database: PostgreSQL's names
        return True, f"{table}_{'_'.join(columns)}_key"
    for uc in sa.inspect(op.get_bind()).get_unique_constraints(table):
        if list(uc["column_names"]) == columns:
            return True, uc["name"]
    # Not seen: SQLite does not reflect a column's inline UNIQUE (older create_all output), and
    # batch mode's copy of the table drops it; the named one below takes its place.
    return False, None


def _rename_unique(table: str, columns: list[str], new: str) -> None:
    found, old = _unique(table, columns)
    # SQLite cannot alter a constraint: batch mode copies the table; the naming convention names
    # the reflected unnamed constraint so that it can be dropped. Elsewhere these run directly.
    with op.batch_alter_table(table, naming_convention=NAMING, recreate="auto") as batch:
        if found:
            batch.drop_constraint(
                old or NAMING["uq"] % {"table_name": table, "column_0_N_name": "_".join(columns)},
                type_="unique",
            )
        batch.create_unique_constraint(new, columns)


def upgrade() -> None:
    for table, columns in UNIQUES.items():
        _rename_unique(table, columns, f"uq_{table}_{'_'.join(columns)}")
    with op.batch_alter_table("api_keys") as batch:
        batch.create_check_constraint(op.f("ck_api_keys_sample_rate"), SAMPLE_RATE_CHECK)
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_sample_rate"), type_="check")
    for table, columns in UNIQUES.items():
        # PostgreSQL's own name for an unnamed constraint, as revision 0001 left it.
        _rename_unique(table, columns, f"{table}_{'_'.join(columns)}_key")
