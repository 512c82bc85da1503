"""Files API (admin scope), as OpenAI's for fine-tuning data:

- ``POST /v1/files`` (multipart ``file`` and ``purpose``; only ``fine-tune``): the file is
  validated line by line (``shared.data``) and refused with the line-level report (400) when
  more than 2% of its lines are invalid; accepted files are kept under
  ``$TUNEGATE_DATA_DIR/files/<id>.jsonl``.
- ``GET /v1/files/{file_id}``; ``GET /v1/files/{file_id}/content`` (the bytes; a job's
  ``result_files`` CSV grows while the job runs).

Token lengths are checked by the trainer (it has the tokenizer); the gateway never loads torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import FileResponse

from gateway.deps import State, admin_key
from shared.data import DatasetRejected, validate_lines
from shared.errors import InvalidRequest, NotFound
from trainer.records import FileStore

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(admin_key)])

MAX_FILE_BYTES = 512 * 2**20  # one upload, bytes


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": int(row["created_at"].timestamp()), "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "status_details": None}


def files_dir(state: Any) -> Path:
    return Path(state.settings.data_dir) / "files"


def store_upload(data: bytes, filename: str, purpose: str, folder: Path,
                  store: FileStore) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"file is not UTF-8 text: {exc}", param="file") from exc
    report = validate_lines(io.StringIO(text))
    if not report.accepted:
        raise DatasetRejected(report)
    file_id = "file-" + secrets.token_hex(12)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.jsonl"
    tmp = folder / f".{file_id}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    summary = report.to_dict()
    summary["issues"] = summary["issues"][:100]
    return store.add(id=file_id, filename=filename[:500], purpose=purpose, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), path=str(path), report=summary)


@router.post("")
async def create_file(
    state: State,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise InvalidRequest(f"purpose {purpose!r} is not supported; use 'fine-tune'",
                             param="purpose")
    data = await file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise InvalidRequest(f"file is larger than {MAX_FILE_BYTES} bytes", param="file")
    row = await to_thread.run_sync(store_upload, data, file.filename or "upload.jsonl", purpose,
                                   files_dir(state), FileStore(state.db))
    return file_object(row)


@router.get("/{file_id}")
async def get_file(file_id: str, state: State) -> dict[str, Any]:
    row = await to_thread.run_sync(FileStore(state.db).get, file_id)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    return file_object(row)


@router.get("/{file_id}/content")
async def file_content(file_id: str, state: State) -> FileResponse:
    row = await to_thread.run_sync(FileStore(state.db).get, file_id)
    path = Path(row["path"]) if row else None
    if path is None or not path.is_file() or files_dir(state).resolve() not in \
            path.resolve().parents:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    kind = "text/csv" if path.suffix == ".csv" else "application/jsonl"
    return FileResponse(path, media_type=kind, filename=row["filename"] if row else None)
