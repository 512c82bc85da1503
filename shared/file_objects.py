"""Uploaded files (``/v1/files``) in the artifact store, one object each, recorded in SQL.

A file's bytes are the object ``files/<id>.<ext>`` of the artifact store
(``shared.artifact_store``: a local folder by default, S3 or another fsspec store when
configured), the same store adapter versions live in; its ``FileRecord`` row (``path``) holds that
key, relative to the store. Rows written before files moved into the store hold an absolute path
under ``<data_dir>/files``; those files are read where they are (no migration).

- ``ObjectWriter`` writes a new object piece by piece, hashing and counting as it goes; nothing is
  held whole in memory or spooled anywhere else first. ``abort`` removes what was written.
- ``finish_upload`` validates the written object line by line (``shared.data``), read back from
  the store, and records it; a refused file is removed.
- ``open_file`` opens a recorded file for reading (the content endpoint, the traffic merge);
  ``local_file`` gives a local path of it (the trainer reads training files from disk).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

from shared.artifact_store import FILES_DIR, ArtifactStore
from shared.data import DatasetRejected, validate_lines
from shared.errors import InvalidRequest, NotFound
from shared.job_records import FileStore

CHUNK_BYTES = 2**20  # written to or read from the store at a time, bytes


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def object_key(file_id: str, ext: str = "jsonl") -> str:
    return f"{FILES_DIR}/{file_id}.{ext}"


class ObjectWriter:
    """A new object of ``store`` at ``key``, written piece by piece (blocking: run it in a
    worker thread from async code)."""

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store, self.key = store, key
        self.digest = hashlib.sha256()
        self.size = 0
        self._out = store.open(key, "wb")

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self._out.write(data)

    def close(self) -> None:
        self._out.close()

    def abort(self) -> None:
        """Drop the object, whatever was written of it: an object store's unfinished multipart
        upload is aborted (never completed), a local file closed and removed."""
        try:
            if self.store.is_local:
                self._out.close()
            else:
                self._out.discard()
                self._out.closed = True  # nothing left to flush
        finally:
            self.store.fs.invalidate_cache()
            if self.store.exists(self.key):
                self.store.remove(self.key)


def finish_upload(writer: ObjectWriter, file_id: str, filename: str, purpose: str,
                  files: FileStore) -> dict[str, Any]:
    """Close ``writer``'s object, validate it from the store and record it (its row); a refused
    file (400 with the line-level report) is removed."""
    try:
        writer.close()
        try:
            with writer.store.open(writer.key, "rb") as raw, \
                    io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
                report = validate_lines(text, keep_examples=False)
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"file is not UTF-8 text: {exc}", param="file") from exc
        if not report.accepted:
            raise DatasetRejected(report)
        summary = report.to_dict()
        summary["issues"] = summary["issues"][:100]
        return files.add(id=file_id, filename=filename[:500], purpose=purpose, bytes=writer.size,
                         sha256=writer.digest.hexdigest(), path=writer.key, report=summary)
    except BaseException:
        writer.abort()
        raise


def store_file(src: BinaryIO, filename: str, purpose: str, store: ArtifactStore,
               files: FileStore) -> dict[str, Any]:
    """``src`` (a readable binary stream) as a new validated file, copied in pieces."""
    file_id = new_file_id()
    writer = ObjectWriter(store, object_key(file_id))
    try:
        while chunk := src.read(CHUNK_BYTES):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return finish_upload(writer, file_id, filename, purpose, files)


def is_legacy(path: str) -> bool:
    """A row written before files moved into the store: an absolute local path."""
    return os.path.isabs(path)


def _legacy_path(path: str, legacy_dir: Path) -> Path | None:
    p = Path(path)
    if not p.is_file() or legacy_dir.resolve() not in p.resolve().parents:
        return None
    return p


def local_path(store: ArtifactStore, row: dict[str, Any], legacy_dir: Path) -> Path | None:
    """Where a recorded file lies on this machine when it does (legacy files, local stores);
    None when it is missing or lives in a remote store."""
    path = str(row["path"])
    if is_legacy(path):
        return _legacy_path(path, legacy_dir)
    if not store.is_local or not path.startswith(FILES_DIR + "/"):
        return None
    p = Path(store.path(path))
    return p if p.is_file() and not p.is_symlink() else None


def open_file(store: ArtifactStore, row: dict[str, Any], legacy_dir: Path) -> BinaryIO:
    """The recorded file's bytes for reading (404 when its object or legacy file is gone)."""
    path = str(row["path"])
    missing = NotFound(f"No such file: {row['id']}", param="file_id")
    if is_legacy(path) or store.is_local:
        local = local_path(store, row, legacy_dir)
        if local is None:
            raise missing
        return local.open("rb")
    if not path.startswith(FILES_DIR + "/") or not store.exists(path):
        raise missing
    return store.open(path, "rb")  # type: ignore[no-any-return]


def public_path(store: ArtifactStore, path: str) -> str:
    """What a job's spec names a recorded file by: a legacy path as it is, else the store's
    name for the object (a local path, or its URL)."""
    return path if is_legacy(path) else store.public_path(path)


def local_file(store: ArtifactStore, name: str, work_dir: Path) -> str:
    """A local path to read the file a job's spec names (``public_path``): local files as they
    are, an object of a remote store downloaded into ``work_dir`` first."""
    prefix = store.public_path(FILES_DIR) + "/"
    if store.is_local or not name.startswith(prefix):
        return name
    key = f"{FILES_DIR}/{name[len(prefix):]}"
    if "/" in key[len(FILES_DIR) + 1:] or ".." in key:
        raise InvalidRequest(f"file {name!r} is not an object of the store", param="file")
    dst = work_dir / "inputs" / key.rsplit("/", 1)[1]
    dst.parent.mkdir(parents=True, exist_ok=True)
    store.fs.get_file(store.path(key), str(dst))
    return str(dst)
