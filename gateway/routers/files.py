"""Files API (admin scope), as OpenAI's for fine-tuning data:

- ``POST /v1/files`` (multipart ``file`` and ``purpose``; only ``fine-tune``): the file streams
  into the artifact store as it arrives (``gateway.uploads``; the body is capped at
  ``max_upload_bytes``), is validated line by line from there (``shared.data``), and is refused
  with the line-level report (400) when more than 2% of its lines are invalid. Accepted files are
  the objects ``files/<id>.jsonl`` of the store (``shared.file_objects``).
- ``GET /v1/files/{file_id}``; ``GET /v1/files/{file_id}/content`` (the bytes, read from the
  store, or from ``$TUNEGATE_DATA_DIR/files`` for files recorded before uploads moved into the
  store; a job's ``result_files`` CSV grows while the job runs).

Token lengths are checked by the trainer (it has the tokenizer); the gateway never loads torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, StreamingResponse

from gateway.deps import State, admin_key
from gateway.uploads import receive_upload
from shared.errors import NotFound
from shared.file_objects import CHUNK_BYTES, local_path, open_file
from shared.job_records import FileStore

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(admin_key)])

UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string"}}}}}}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": int(row["created_at"].timestamp()), "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "status_details": None}


def legacy_files_dir(state: Any) -> Path:
    """Where files were kept before uploads moved into the artifact store (still read)."""
    return Path(state.settings.data_dir) / "files"


@router.post("", openapi_extra={"requestBody": UPLOAD_BODY})
async def create_file(state: State, request: Request) -> dict[str, Any]:
    # The body is capped as it arrives (gateway.limits: ``max_upload_bytes``, admin keys).
    row = await receive_upload(request, state.registry.store, FileStore(state.db))
    return file_object(row)


@router.get("/{file_id}")
async def get_file(file_id: str, state: State) -> dict[str, Any]:
    row = await to_thread.run_sync(FileStore(state.db).get, file_id)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    return file_object(row)


def _blocks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while block := f.read(CHUNK_BYTES):
            yield block


@router.get("/{file_id}/content", response_class=FileResponse, responses={200: {
    "description": "The file's bytes", "content": {"text/csv": {}, "application/jsonl": {}}}})
async def file_content(file_id: str, state: State) -> Any:
    row = await to_thread.run_sync(FileStore(state.db).get, file_id)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param="file_id")
    kind = "text/csv" if str(row["path"]).endswith(".csv") else "application/jsonl"
    store, legacy = state.registry.store, legacy_files_dir(state)
    path = await to_thread.run_sync(local_path, store, row, legacy)
    if path is not None:
        return FileResponse(path, media_type=kind, filename=row["filename"])
    f = await to_thread.run_sync(open_file, store, row, legacy)  # a remote store's object
    return StreamingResponse(_blocks(f), media_type=kind, headers={
        "content-disposition": f"attachment; filename*=utf-8''{quote(row['filename'])}"})
