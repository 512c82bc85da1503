"""Fine-tuning jobs API (admin scope), compatible with the ``openai`` SDK's
``fine_tuning.jobs.create / retrieve / list / cancel / list_events / checkpoints.list``:

- ``POST /v1/fine_tuning/jobs``: ``model``, ``training_file``, ``validation_file``, ``suffix``
  (the adapter name; default ``ft-<job>``), ``seed``, ``hyperparameters`` (``n_epochs``,
  ``batch_size``, ``learning_rate_multiplier`` of 2e-4), ``metadata``; our fields (top level,
  ``extra_body`` in the SDK): ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``,
  ``golden_file``, ``gate_threshold``, ``gate_tolerance``, ``scorer``, ``max_steps``,
  ``max_seq_length``, ``golden_limit``, ``evaluate_base``, and ``traffic``: ``{"model": NAME or
  NAME@vN, "since": time, "until": time?}`` adds the labelled sampled traffic of that model (see
  ``shared.traffic_datasets``) to ``training_file``; the merged file is validated like an upload,
  stored as a file of its own, and the job trains on it (the counts are in ``tunegate.traffic``).
- ``GET /v1/fine_tuning/jobs`` (``after``, ``limit``), ``GET .../{id}``, ``POST .../{id}/cancel``,
  ``GET .../{id}/events`` (newest first, ``after``, ``limit``; ``type`` = ``message`` or
  ``metrics``, a tunegate filter), ``GET .../{id}/checkpoints``.

Progress (``trainer.progress``): sparse ``metrics`` events in OpenAI's shape, a per-step CSV in
``result_files`` (``GET /v1/files/{id}/content``), a running ``trained_tokens`` and
``estimated_finish``; ``tunegate.progress`` is the latest step, ``tunegate.auto`` what ``"auto"``
hyperparameters chose, ``tunegate.rollout`` how the registered version reaches users.

Jobs are queued on arq (Redis) for ``tunegate trainer worker`` through the queue's contract
(``shared.job_queue``); records live in SQL (``shared.job_records``). The base ``model`` names a
folder under ``$TUNEGATE_DATA_DIR/models``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field, ValidationError, field_validator

from gateway.deps import State, admin_key
from shared.errors import InvalidRequest, NotFound, Overloaded
from shared.file_objects import open_file, public_path, store_file
from shared.job_queue import cancel_training, enqueue_training, new_job_id
from shared.job_records import TERMINAL, FileStore, JobStore
from shared.job_spec import ALL_PROJECTIONS, LoraSpec, TrainSpec
from shared.queue import arq_options, redis_settings
from shared.tracing import current_traceparent

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"],
                   dependencies=[Depends(admin_key)])

BASE_LR = 2e-4  # learning_rate_multiplier scales this
# A base model is named by its folder in <data_dir>/models: a plain name, never a path.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Hyperparameters(BaseModel):
    # Bounds match shared.job_spec.TrainSpec's, so that a bad value is this request's 400.
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    # x BASE_LR; the learning rate itself must stay in (0, 1].
    learning_rate_multiplier: Annotated[
        float, Field(gt=0, le=1.0 / BASE_LR, allow_inf_nan=False)] | Literal["auto"] = "auto"


class TrafficSource(BaseModel):
    model: str = Field(min_length=1, max_length=200)  # NAME, NAME@vN or base
    since: dt.datetime  # ISO 8601 or unix seconds; without a zone: UTC
    until: dt.datetime | None = None


class JobCreate(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    metadata: dict[str, str] | None = None
    # tunegate's own fields
    lora_r: int = Field(default=16, ge=1, le=256)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS),
                                           min_length=1, max_length=len(ALL_PROJECTIONS))
    golden_file: str | None = None
    gate_threshold: float = Field(default=0.95, ge=0, le=1)
    gate_tolerance: float = Field(default=0.01, ge=0, le=1)
    scorer: str | None = None
    max_steps: int | None = Field(default=None, ge=1)
    max_seq_length: int = Field(default=512, ge=16, le=32768)
    golden_limit: int | None = Field(default=None, ge=1)
    evaluate_base: bool = False
    traffic: TrafficSource | None = None

    @field_validator("lora_target_modules")
    @classmethod
    def _known_modules(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(ALL_PROJECTIONS))
        if unknown:
            raise ValueError(f"unknown target modules {unknown}: choose from {ALL_PROJECTIONS}")
        return v


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI, state: Any) -> AsyncIterator[None]:
    app.state.fine_tuning = {"pool": None}
    if state.settings.redis_url:
        from arq import create_pool
        from redis.exceptions import RedisError

        try:
            app.state.fine_tuning["pool"] = await create_pool(
                redis_settings(state.settings.redis_url), **arq_options())
        except (OSError, RedisError) as exc:  # Redis down: the gateway must still serve inference
            import logging

            logging.getLogger("tunegate.gateway").warning(
                "no arq pool (fine-tuning jobs refused until restart): %r", exc)
    try:
        yield
    finally:
        pool = app.state.fine_tuning["pool"]
        if pool is not None:
            await pool.aclose()


def _ts(t: Any) -> int | None:
    return int(t.timestamp()) if t is not None else None


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    spec = row["spec"] or {}
    result = row["result"] or {}
    auto = spec.get("auto_chosen") or []
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": _ts(row["created_at"]),
        "finished_at": _ts(row["finished_at"]), "model": row["model"],
        "fine_tuned_model": row["fine_tuned_model"], "organization_id": "tunegate",
        "result_files": [row["result_file"]] if row.get("result_file") else [],
        "status": row["status"],
        "training_file": spec.get("training_file_id"),
        "validation_file": spec.get("validation_file_id"),
        "hyperparameters": {
            # "auto" until the worker has seen the data; then what auto chose (tunegate.auto).
            "n_epochs": "auto" if spec.get("auto_epochs") and "n_epochs" not in auto
            else spec.get("n_epochs"),
            "batch_size": spec.get("batch_size"),
            "learning_rate_multiplier": spec.get("learning_rate", BASE_LR) / BASE_LR},
        "trained_tokens": row["trained_tokens"], "error": row["error"], "seed": spec.get("seed"),
        "metadata": spec.get("metadata") or None, "suffix": spec.get("name"),
        "estimated_finish": _ts(row.get("estimated_finish")) if row["status"] == "running"
        else None,
        "integrations": [],
        "tunegate": {"result": result, "golden_file": spec.get("golden_file_id"),
                     "cost": result.get("cost"),
                     "traffic": spec.get("traffic"), "progress": row.get("progress"),
                     "auto": {k: spec.get(k) for k in auto},
                     "total_steps": spec.get("total_steps"),
                     "rollout": result.get("rollout")},
    }


def _cost_metrics(cost: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's cost figures (trainer.cost): device seconds and the estimate."""
    if not cost:
        return {}
    return {"device_seconds": cost["device_seconds"]["total"],
            "estimated_cost": cost["estimated_cost"], "currency": cost["currency"]}


def _file_path(state: Any, file_id: str | None, param: str) -> str | None:
    if file_id is None:
        return None
    row = FileStore(state.db).get(file_id)
    if row is None:
        raise InvalidRequest(f"file {file_id!r} does not exist", param=param,
                             code="file_not_found")
    return public_path(state.registry.store, str(row["path"]))


def registered_base(models_dir: Path, name: str) -> Path:
    """The folder of base model ``name``: an entry of the models folder (``tunegate models pull``
    or the operator put it there) holding a ``config.json``. A path (``../x``, ``a/b``) or any
    other name is this request's 400."""
    unknown = InvalidRequest(f"base model {name!r} is not in the models folder", param="model",
                             code="model_not_found")
    if not _MODEL_NAME.match(name) or ".." in name:
        raise unknown
    try:
        entries = set(os.listdir(models_dir))
    except OSError:
        raise unknown from None
    if name not in entries or not (models_dir / name / "config.json").is_file():
        raise unknown
    return models_dir / name


def check_scorer(spec: str | None, allowed: list[str]) -> None:
    """Built-in scorers are always allowed; an importable one (``pkg.mod:attr``) only when the
    operator listed it (``TUNEGATE_GATEWAY_ALLOWED_SCORERS``): it is code the worker imports."""
    if not spec or spec == "exact" or spec.split(":", 1)[0] in ("label_set", "json_fields"):
        return
    if spec not in allowed:
        raise InvalidRequest(f"scorer {spec!r} is not allowed: use exact, label_set:..., "
                             "json_fields:..., or one the operator allows", param="scorer",
                             code="scorer_not_allowed")


def _create(state: Any, body: JobCreate, traceparent: str | None = None,
            ) -> tuple[TrainSpec, dict[str, Any]]:
    base = registered_base(state.settings.models_dir, body.model)
    check_scorer(body.scorer, state.settings.allowed_scorers)
    job_id = new_job_id()
    training = _file_path(state, body.training_file, "training_file") or ""
    traffic = None
    if body.traffic is not None:
        training, traffic = _with_traffic(state, body.training_file, body.traffic)
    hp = body.hyperparameters
    try:
        spec = TrainSpec(
            job_id=job_id, name=body.suffix or f"ft-{job_id.removeprefix('ftjob-')[:8]}",
            base_model=str(base), base_model_name=body.model,
            training_file=training,
            validation_file=_file_path(state, body.validation_file, "validation_file"),
            golden_file=_file_path(state, body.golden_file, "golden_file"),
            seed=body.seed if body.seed is not None else 0,
            n_epochs=1 if hp.n_epochs == "auto" else hp.n_epochs,
            batch_size=8 if hp.batch_size == "auto" else hp.batch_size,
            learning_rate=BASE_LR * (1.0 if hp.learning_rate_multiplier == "auto"
                                     else hp.learning_rate_multiplier),
            lora=LoraSpec(r=body.lora_r, alpha=body.lora_alpha, dropout=body.lora_dropout,
                          target_modules=body.lora_target_modules),
            threshold=body.gate_threshold, tolerance=body.gate_tolerance, scorer=body.scorer,
            max_steps=body.max_steps, max_seq_length=body.max_seq_length,
            golden_limit=body.golden_limit, evaluate_base=body.evaluate_base,
            metadata=body.metadata or {},
            auto_epochs=hp.n_epochs == "auto",
            traceparent=traceparent,
        )
    except ValidationError as exc:  # whatever TrainSpec refuses is this request's 400
        err = exc.errors()[0]
        raise InvalidRequest(f"invalid job: {err.get('msg')}",
                             param=".".join(str(x) for x in err.get("loc", ())) or None) from None
    record = {**spec.model_dump(), "training_file_id": body.training_file,
              "validation_file_id": body.validation_file, "golden_file_id": body.golden_file,
              "traffic": traffic}
    row = JobStore(state.db).create(job_id, model=body.model, name=spec.name, spec=record,
                                    status="queued")
    return spec, row


def _with_traffic(state: Any, base_id: str, src: TrafficSource) -> tuple[str, dict[str, Any]]:
    """The base training file plus the labelled traffic of ``src``, stored as a new file
    (validated as uploads are); returns its path and what was added."""
    from gateway.routers.files import legacy_files_dir
    from shared.traffic_datasets import file_keys, traffic_data

    files, store = FileStore(state.db), state.registry.store
    with open_file(store, files.get(base_id) or {"id": base_id, "path": ""},
                   legacy_files_dir(state)) as f:
        base = f.read()
    data = traffic_data(state.db, src.model, src.since, src.until,
                        exclude=file_keys(io.StringIO(base.decode("utf-8", "replace"))))
    if not data.records:
        raise InvalidRequest(
            f"no labelled traffic of {src.model!r} since {src.since.isoformat()} "
            f"({data.samples} labelled samples, {data.skipped} not usable as records)",
            param="traffic", code="no_traffic_data")
    if base and not base.endswith(b"\n"):
        base += b"\n"
    merged = base + ("\n".join(data.lines()) + "\n").encode()
    row = store_file(io.BytesIO(merged), f"traffic-{src.model}.jsonl", "fine-tune", store, files)
    return public_path(store, str(row["path"])), {
        "model": src.model, "since": src.since.isoformat(),
        "until": src.until.isoformat() if src.until else None,
        "merged_file_id": row["id"], **data.summary()}


def _queue(request: Request) -> Any:
    pool = request.app.state.fine_tuning["pool"]
    if pool is None:
        raise Overloaded("fine-tuning needs REDIS_URL: no job queue is configured")
    return pool


@router.post("")
async def create_job(body: JobCreate, state: State, request: Request) -> dict[str, Any]:
    pool = _queue(request)
    # The job's trace continues this request's (the worker's job span is its child).
    spec, row = await to_thread.run_sync(_create, state, body, current_traceparent())
    try:
        await enqueue_training(pool, spec, queue_name=state.settings.queue_name)
    except Exception as exc:  # Redis unreachable: the record must not wait forever
        await to_thread.run_sync(lambda: _jobs(state).set_status(spec.job_id, "failed", error={
            "message": "could not queue the job", "code": "queue_unavailable", "param": None}))
        raise Overloaded("the job queue (Redis) is unavailable; retry later") from exc
    return job_object(row)


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, state: State, request: Request) -> dict[str, Any]:
    pool = _queue(request)
    row = await _get(state, job_id)
    if row["status"] in TERMINAL:
        raise InvalidRequest(f"job {job_id} is already {row['status']}", param="fine_tuning_job_id",
                             code="job_not_cancellable")
    await cancel_training(pool, _jobs(state), job_id)
    return job_object(await _get(state, job_id))


def _jobs(state: Any) -> JobStore:
    return JobStore(state.db)


async def _get(state: Any, job_id: str) -> dict[str, Any]:
    row = await to_thread.run_sync(_jobs(state).get, job_id)
    if row is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return row


@router.get("")
async def list_jobs(state: State, after: str | None = None,
                    limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    rows = await to_thread.run_sync(lambda: _jobs(state).list_jobs(after=after, limit=limit + 1))
    return {"object": "list", "data": [job_object(r) for r in rows[:limit]],
            "has_more": len(rows) > limit}


@router.get("/{job_id}")
async def retrieve_job(job_id: str, state: State) -> dict[str, Any]:
    return job_object(await _get(state, job_id))


@router.get("/{job_id}/events")
async def list_events(job_id: str, state: State, after: str | None = None,
                      limit: int = Query(20, ge=1, le=1000),
                      type: Literal["message", "metrics"] | None = None) -> dict[str, Any]:
    await _get(state, job_id)
    cursor = int(after.removeprefix("ftevent-")) if after and after.removeprefix(
        "ftevent-").isdigit() else None
    rows = await to_thread.run_sync(lambda: _jobs(state).events(
        job_id, after=cursor, limit=limit + 1, newest_first=True, type=type))
    data = [{"id": f"ftevent-{e['id']}", "object": "fine_tuning.job.event",
             "created_at": _ts(e["created_at"]), "level": e["level"], "message": e["message"],
             "data": e["data"], "type": e["type"]} for e in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, state: State) -> dict[str, Any]:
    row = await _get(state, job_id)
    data = []
    if row["fine_tuned_model"]:
        result = row["result"] or {}
        data.append({
            "id": f"ftckpt-{row['id'].removeprefix('ftjob-')}",
            "object": "fine_tuning.job.checkpoint",
            "created_at": _ts(row["finished_at"]), "fine_tuning_job_id": row["id"],
            "fine_tuned_model_checkpoint": row["fine_tuned_model"],
            "step_number": (result.get("train") or {}).get("steps", 0),
            "metrics": {"train_loss": (result.get("train") or {}).get("final_loss"),
                        "golden_score": (result.get("eval") or {}).get("score"),
                        **_cost_metrics(result.get("cost"))},
        })
    return {"object": "list", "data": data, "has_more": False, "first_id": None, "last_id": None}
