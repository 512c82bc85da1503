"""Labels by key, the version counter, job progress, console sessions.

Labels record which key gave them and whether it may label (training data takes only those);
samples keep the client's own request id beside the gateway's (128 characters, one rule);
adapters count their versions (atomic allocation across processes); jobs keep their running
progress, estimate and result file; promotions say what they wait for; console sign-ins.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 17:18:12.427632

Expand/contract: a revision that old code cannot run on (a dropped or renamed column, a new NOT
NULL column without a server default) ships in two releases; see docs/migrations.md.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('console_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('key_id', sa.String(length=40), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('csrf', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('next_version', sa.Integer(), server_default='0',
                                      nullable=False))

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('may_label', sa.Boolean(), nullable=True))

    with op.batch_alter_table('fine_tuning_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('estimated_finish', sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('progress', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('result_file', sa.String(length=64), nullable=True))

    with op.batch_alter_table('promotions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('waiting', sa.String(length=500), nullable=True))

    with op.batch_alter_table('traffic_samples', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_request_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('feedback_key_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('feedback_trusted', sa.Boolean(), server_default=sa.false(),
                                      nullable=False))
        batch_op.alter_column('request_id',
               existing_type=sa.VARCHAR(length=64),
               type_=sa.String(length=128),
               existing_nullable=False)



def downgrade() -> None:
    # Columns are dropped in place (SQLite 3.35+ can): a batch rebuild would drop and re-create
    # tables that others reference, which SQLite's enforced foreign keys refuse. SQLite does not
    # enforce VARCHAR lengths, so the request id's type only changes back elsewhere.
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column('traffic_samples', 'request_id', existing_type=sa.String(length=128),
                        type_=sa.VARCHAR(length=64), existing_nullable=False)
    for table, columns in (
        ('traffic_samples', ('feedback_trusted', 'feedback_key_id', 'client_request_id')),
        ('promotions', ('waiting',)),
        ('fine_tuning_jobs', ('result_file', 'progress', 'estimated_finish')),
        ('api_keys', ('may_label',)),
        ('adapters', ('next_version',)),
    ):
        for column in columns:
            op.drop_column(table, column)
    op.drop_table('console_sessions')
