"""``POST /v1/files`` bodies streamed into the artifact store as they arrive.

The multipart body is parsed piece by piece (``python_multipart``'s push parser) as the client
sends it: the ``file`` part goes straight into a new object of the artifact store
(``shared.file_objects.ObjectWriter``, ``CHUNK_BYTES`` at a time, in a worker thread), the
``purpose`` part (a few bytes) is kept. Nothing is held whole in memory or spooled to a temporary
file. The body cap (``max_upload_bytes``) is enforced by ``gateway.limits.Guard`` as bytes
arrive; when it trips, when the client goes away, or when the body or the file is refused, the
partial object is removed. A complete file is validated from the store and recorded
(``shared.file_objects.finish_upload``).
"""

from __future__ import annotations

from typing import Any

from anyio import CancelScope, to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from shared.artifact_store import ArtifactStore
from shared.errors import InvalidRequest
from shared.file_objects import (
    CHUNK_BYTES,
    ObjectWriter,
    finish_upload,
    new_file_id,
    object_key,
)
from shared.job_records import FileStore

MAX_FIELD_BYTES = 1024  # the ``purpose`` part and every part's headers, bytes
PURPOSES = ("fine-tune",)


class _Events:
    """The push parser's callbacks, turned into a list of events per piece of body."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._header_bytes = 0
        self.done = False

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._on_field,
                "on_header_value": self._on_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": lambda: self.events.append(("end", None)),
                "on_end": self._end}

    def _begin(self) -> None:
        self.headers, self._header_bytes = {}, 0

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_FIELD_BYTES:
            raise InvalidRequest("a multipart part's headers are too long", param="file")

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_done(self) -> None:
        self.events.append(("part", self.headers))

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", data[start:end]))

    def _end(self) -> None:
        self.done = True


class _Upload:
    """What one upload has received so far."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.file_id = new_file_id()
        self.writer: ObjectWriter | None = None
        self.filename = "upload.jsonl"
        self.purpose: bytes | None = None
        self.part: str | None = None  # "file", "purpose", or None (ignored)
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    async def handle(self, kind: str, value: Any) -> None:
        if kind == "part":
            await self._start(value)
        elif kind == "data":
            if self.part == "file":
                self.pending.append(value)
                self.pending_bytes += len(value)
                if self.pending_bytes >= CHUNK_BYTES:
                    await self.flush()
            elif self.part == "purpose":
                assert self.purpose is not None
                self.purpose += value
                if len(self.purpose) > MAX_FIELD_BYTES:
                    raise InvalidRequest("purpose is too long", param="purpose")
        elif kind == "end" and self.part == "file":
            await self.flush()
        elif kind == "end" and self.part == "purpose":
            check_purpose(self.purpose)  # before a file that would be refused is streamed

    async def _start(self, headers: dict[bytes, bytes]) -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        self.part = None
        if name == b"file":
            if self.writer is not None:
                raise InvalidRequest("send one file per upload", param="file")
            if b"filename" in options:
                self.filename = options[b"filename"].decode("utf-8", "replace") or self.filename
            self.writer = await to_thread.run_sync(ObjectWriter, self.store,
                                                   object_key(self.file_id))
            self.part = "file"
        elif name == b"purpose":
            if self.purpose is not None:
                raise InvalidRequest("send one purpose per upload", param="purpose")
            self.purpose = b""
            self.part = "purpose"

    async def flush(self) -> None:
        if self.pending and self.writer is not None:
            data = b"".join(self.pending)
            self.pending, self.pending_bytes = [], 0
            await to_thread.run_sync(self.writer.write, data)

    async def abort(self) -> None:
        if self.writer is not None:
            with CancelScope(shield=True):
                await to_thread.run_sync(self.writer.abort)


def check_purpose(raw: bytes | None) -> str:
    purpose = (raw or b"").decode("utf-8", "replace")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose {purpose!r} is not supported; use 'fine-tune'",
                             param="purpose")
    return purpose


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest("send the file as multipart/form-data (fields 'file' and "
                             "'purpose')", param="file")
    return boundary


async def receive_upload(request: Request, store: ArtifactStore, files: FileStore,
                         ) -> dict[str, Any]:
    """The upload in ``request``'s body, stored, validated and recorded (its ``FileRecord``
    row). Any failure on the way removes what was written."""
    events = _Events()
    parser = MultipartParser(_boundary(request), events.callbacks())  # type: ignore[arg-type]
    upload = _Upload(store)
    try:
        async for piece in request.stream():
            if piece:
                try:
                    parser.write(piece)
                except MultipartParseError as exc:
                    raise InvalidRequest(f"the multipart body does not parse: {exc}",
                                         param="file") from None
            for kind, value in events.events:
                await upload.handle(kind, value)
            events.events.clear()
        if not events.done:
            raise InvalidRequest("the multipart body ended before its closing boundary",
                                 param="file")
        if upload.writer is None:
            raise InvalidRequest("the 'file' field is required", param="file")
        purpose = check_purpose(upload.purpose)
        await upload.flush()
    except ClientDisconnect:
        await upload.abort()
        raise InvalidRequest("the client went away before the upload ended") from None
    except BaseException:
        await upload.abort()
        raise
    writer = upload.writer
    return await to_thread.run_sync(finish_upload, writer, upload.file_id, upload.filename,
                                    purpose, files)
