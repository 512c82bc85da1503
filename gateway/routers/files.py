"""Files API (admin scope), as OpenAI's for fine-tuning data:

- ``POST /v1/files`` (multipart ``file`` and ``purpose``; only ``fine-tune``): the file is
  validated line by line (``shared.data``) and refused with the line-level report (400) when
  more than 2% of its lines are invalid; accepted files are kept under
  ``$TUNEGATE_DATA_DIR/files/<id>.jsonl`` (copied there in pieces, never held in memory whole;
  the body is capped at ``max_upload_bytes``).
- ``GET /v1/files/{file_id}``; ``GET /v1/files/{file_id}/content`` (the bytes; a job's
  ``result_files`` CSV grows while the job runs).

Token lengths are checked by the trainer (it has the tokenizer); the gateway never loads torch.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import FileResponse

from gateway.deps import State, admin_key
from shared.data import DatasetRejected, validate_lines
from shared.errors import InvalidRequest, NotFound
from shared.job_records import FileStore

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(admin_key)])

CHUNK_BYTES = 2**20  # copied at a time from the upload to its file, bytes


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": int(row["created_at"].timestamp()), "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "status_details": None}


def files_dir(state: Any) -> Path:
    return Path(state.settings.data_dir) / "files"


def store_upload(src: BinaryIO, filename: str, purpose: str, folder: Path,
                 store: FileStore) -> dict[str, Any]:
    """Copy the upload to its place in ``CHUNK_BYTES`` pieces (hashing as it goes), then
    validate it from there, line by line: the file is never held in memory whole."""
    file_id = "file-" + secrets.token_hex(12)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.jsonl"
    tmp = folder / f".{file_id}.tmp"
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        try:
            with tmp.open(encoding="utf-8", newline="") as text:
                report = validate_lines(text)
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"file is not UTF-8 text: {exc}", param="file") from exc
        if not report.accepted:
            raise DatasetRejected(report)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    summary = report.to_dict()
    summary["issues"] = summary["issues"][:100]
    return store.add(id=file_id, filename=filename[:500], purpose=purpose, bytes=size,
                     sha256=digest.hexdigest(), path=str(path), report=summary)


@router.post("")
async def create_file(
    state: State,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    # The body is capped before it is read (gateway.limits: ``max_upload_bytes``, admin keys).
    if purpose != "fine-tune":
        raise InvalidRequest(f"purpose {purpose!r} is not supported; use 'fine-tune'",
                             param="purpose")
    row = await to_thread.run_sync(store_upload, file.file, file.filename or "upload.jsonl",
                                   purpose, files_dir(state), FileStore(state.db))
    return file_object(row)


@router.get("/{file_id}")
async def get_file(file_id: str, state: State) -> dict[str, Any]:
    row = await to_thread.run_sync(FileStore(state.db).get, file_id)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    return file_object(row)


@router.get("/{file_id}/content", response_class=FileResponse, responses={200: {
    "description": "The file's bytes", "content": {"text/csv": {}, "application/jsonl": {}}}})
async def file_content(file_id: str, state: State) -> FileResponse:
    row = await to_thread.run_sync(FileStore(state.db).get, file_id)
    path = Path(row["path"]) if row else None
    if path is None or not path.is_file() or files_dir(state).resolve() not in \
            path.resolve().parents:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    kind = "text/csv" if path.suffix == ".csv" else "application/jsonl"
    return FileResponse(path, media_type=kind, filename=row["filename"] if row else None)
