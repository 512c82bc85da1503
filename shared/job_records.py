"""Fine-tuning job records and their events, in the same SQL database as the registry.

Tables subclass ``shared.db.Base``: importing this module before ``Database.create_all()`` (the
worker and the gateway both do) creates them. The gateway's fine-tuning API reads these rows; the
worker writes them.

Statuses follow OpenAI's: ``validating_files -> queued -> running -> succeeded | failed |
cancelled``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, or_, select, update
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, Database, utcnow

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"validating_files", "queued", "running"})


class FineTuningJob(Base):
    __tablename__ = "fine_tuning_jobs"
    # GET /v1/fine_tuning/jobs lists newest first, paginated by (created_at, id).
    __table_args__ = (Index("ix_fine_tuning_jobs_created", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "ftjob-..."
    status: Mapped[str] = mapped_column(String(24), index=True)
    model: Mapped[str] = mapped_column(String(200))  # the base model's served name
    name: Mapped[str] = mapped_column(String(64))  # the adapter name (suffix)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # shared.job_spec.TrainSpec
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200), nullable=True)  # NAME@vN
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # message/code/param
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # train/eval/gate
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Refreshed with progress; a running job with an old heartbeat lost its worker.
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # While running (trainer.progress): when training should end, and the latest step's
    # {step, total_steps, train_loss, learning_rate, tokens_per_s, eta_s}.
    estimated_finish: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result_file: Mapped[str | None] = mapped_column(String(64), nullable=True)  # per-step CSV


class FineTuningEvent(Base):
    __tablename__ = "fine_tuning_events"
    __table_args__ = (Index("ix_fine_tuning_events_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warn | error
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class FileRecord(Base):
    """An uploaded file (``POST /v1/files``) or a job's CSV. ``path``: its object's key in the
    artifact store (``files/<id>.jsonl``), or, for rows written before files moved into the store
    (and CSVs of a running job with a remote store), an absolute local path
    (``shared.file_objects``)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "file-..."
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1000))
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # validation
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, **fields: Any) -> dict[str, Any]:
        with self.db.session() as s:
            row = FileRecord(**fields)
            s.add(row)
            s.flush()
            return {c.name: getattr(row, c.name) for c in FileRecord.__table__.columns}

    def set_bytes(self, file_id: str, size: int, path: str | None = None) -> None:
        """The file's final size (and its new place, when it moved)."""
        values: dict[str, Any] = {"bytes": size} if path is None else {"bytes": size, "path": path}
        with self.db.session() as s:
            s.execute(update(FileRecord).where(FileRecord.id == file_id).values(**values))

    def get(self, file_id: str) -> dict[str, Any] | None:
        with self.db.session() as s:
            row = s.get(FileRecord, file_id)
            if row is None:
                return None
            return {c.name: getattr(row, c.name) for c in FileRecord.__table__.columns}


def _row(job: FineTuningJob) -> dict[str, Any]:
    return {c.name: getattr(job, c.name) for c in FineTuningJob.__table__.columns}


class JobStore:
    """Reads and writes job records. Thread-safe (each call opens its own session)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, job_id: str, *, model: str, name: str, spec: dict[str, Any],
               status: str = "queued") -> dict[str, Any]:
        with self.db.session() as s:
            job = FineTuningJob(id=job_id, status=status, model=model, name=name, spec=spec)
            s.add(job)
            s.flush()
            return _row(job)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.db.session() as s:
            job = s.get(FineTuningJob, job_id)
            return _row(job) if job else None

    def list_jobs(self, *, after: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        with self.db.session() as s:
            q = select(FineTuningJob).order_by(
                FineTuningJob.created_at.desc(), FineTuningJob.id.desc())
            if after:
                anchor = s.get(FineTuningJob, after)
                if anchor is not None:
                    q = q.where(FineTuningJob.created_at <= anchor.created_at,
                                FineTuningJob.id != after)
            return [_row(j) for j in s.scalars(q.limit(limit))]

    def set_status(self, job_id: str, status: str, *, only_from: frozenset[str] | None = None,
                   **fields: Any) -> bool:
        """Move to ``status`` (optionally only from one of ``only_from``); returns whether the row
        changed. Terminal statuses are final: a finished job never moves again."""
        now = utcnow()
        values: dict[str, Any] = {"status": status, **fields}
        if status == "running":
            values.setdefault("started_at", now)
            values.setdefault("heartbeat_at", now)
        if status in TERMINAL:
            values.setdefault("finished_at", now)
        allowed = (only_from or ACTIVE) & ACTIVE
        with self.db.session() as s:
            res = s.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.status.in_(allowed))
                .values(**values)
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def claim(self, job_id: str) -> bool:
        """Refresh the heartbeat of a job that is still ``running``; False when it is not (the
        stale-job sweep failed it, or it was cancelled). Called just before registering: a fresh
        heartbeat keeps the sweep (which fails only jobs whose heartbeat is still old when it
        writes) off the job while it registers."""
        with self.db.session() as s:
            res = s.execute(update(FineTuningJob)
                            .where(FineTuningJob.id == job_id, FineTuningJob.status == "running")
                            .values(heartbeat_at=utcnow()))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def count_by_status(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.db.session() as s:
            rows = s.execute(select(FineTuningJob.status, func.count())
                             .group_by(FineTuningJob.status)).all()
        return {str(st): int(n) for st, n in rows}
    def set_progress(self, job_id: str, *, trained_tokens: int, estimated_finish: dt.datetime,
                     progress: dict[str, Any]) -> None:
        """A running job's latest step (also its heartbeat)."""
        with self.db.session() as s:
            s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id,
                                                  FineTuningJob.status == "running")
                      .values(trained_tokens=trained_tokens, estimated_finish=estimated_finish,
                              progress=progress, heartbeat_at=utcnow()))

    def update_spec(self, job_id: str, **fields: Any) -> None:
        """Merge ``fields`` into the job's recorded spec (what ``auto`` chose, the result file)."""
        with self.db.session() as s:
            job = s.get(FineTuningJob, job_id)
            if job is not None:
                job.spec = {**(job.spec or {}), **fields}

    def set_result_file(self, job_id: str, file_id: str) -> None:
        with self.db.session() as s:
            s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                      .values(result_file=file_id))

    def heartbeat(self, job_id: str) -> None:
        with self.db.session() as s:
            s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                      .values(heartbeat_at=utcnow()))

    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None, heartbeat: bool = True) -> None:
        with self.db.session() as s:
            s.add(FineTuningEvent(job_id=job_id, level=level, type=type, message=message[:2000],
                                  data=data))
            if heartbeat:
                s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                          .values(heartbeat_at=utcnow()))

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100,
               newest_first: bool = False, type: str | None = None) -> list[dict[str, Any]]:
        with self.db.session() as s:
            q = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
            if type is not None:
                q = q.where(FineTuningEvent.type == type)
            if after is not None:
                q = q.where(
                    FineTuningEvent.id < after if newest_first else FineTuningEvent.id > after)
            q = q.order_by(FineTuningEvent.id.desc() if newest_first else FineTuningEvent.id)
            return [{"id": e.id, "created_at": e.created_at, "level": e.level, "type": e.type,
                     "message": e.message, "data": e.data} for e in s.scalars(q.limit(limit))]

    def fail_stale(self, older_than_s: float) -> list[str]:
        """Fail running jobs whose heartbeat is older than ``older_than_s``: their worker died.
        Returns their ids."""
        cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
        with self.db.session() as s:
            rows = s.scalars(select(FineTuningJob).where(FineTuningJob.status == "running")).all()
            stale = [j.id for j in rows if _aware(j.heartbeat_at or j.created_at) < cutoff]
        failed = []
        for job_id in stale:
            # Conditional on the heartbeat still being old: a worker that beat (or claimed the
            # job to register it) since the read above keeps its job.
            with self.db.session() as s:
                res = s.execute(
                    update(FineTuningJob)
                    .where(FineTuningJob.id == job_id, FineTuningJob.status == "running",
                           or_(FineTuningJob.heartbeat_at.is_(None),
                               FineTuningJob.heartbeat_at < cutoff))
                    .values(status="failed", error=worker_lost_error(), finished_at=utcnow()))
                changed = bool(res.rowcount)  # type: ignore[attr-defined]
            if changed:
                failed.append(job_id)
                self.add_event(job_id, "worker lost mid-job; the job failed and was not retried",
                               level="error", heartbeat=False)
        return failed


def worker_lost_error() -> dict[str, Any]:
    return {"message": "the worker running this job stopped mid-job; the job is not retried "
                       "(submit it again)", "code": "worker_lost", "param": None}


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes for timezone-aware columns.
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
