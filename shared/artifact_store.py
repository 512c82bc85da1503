"""The artifact store: the files of adapter versions, in a local folder or an object store.

``ArtifactStore(url, storage_options)`` takes a local path or an fsspec URL (``s3://bucket/
prefix`` through s3fs, with the endpoint and credentials in ``storage_options``). Paths given to
its methods are relative to the store's root, in POSIX form. It knows files, not versions: the
registry (``shared.registry``) decides where a version lives and records it in SQL.

- ``move_tree`` is one atomic rename on a local disk. Object stores have neither folders nor
  rename: each file is copied, then the source deleted; readers never see a half-copied version
  because versions are found through their database row, committed after the copy.
- ``content_hash`` is the sha256 over the sorted ``(relative path, sha256 of file)`` pairs of a
  folder, the manifest (``MANIFEST_FILE``, written last) excluded.
- ``download`` copies a folder into a local one once (a temporary folder, then one rename), so
  engines, which load adapters from local folders, can use a remote version; a folder whose
  manifest is there is complete and never downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from shared.errors import InvalidRequest

MANIFEST_FILE = "tunegate-manifest.json"
ADAPTERS_DIR = "adapters"


class ArtifactStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        self.root = root.rstrip("/")

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p if isinstance(p, str) else p[0]

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def path(self, rel: str) -> str:
        """The path fsspec takes for ``rel``."""
        return posixpath.join(self.root, rel)

    def public_path(self, rel: str) -> str:
        """What the store calls ``rel`` outside this process: a local path, else its URL."""
        return self.path(rel) if self.is_local else f"{self.protocol}://{self.path(rel)}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        self.fs.rm(self.path(rel))

    def write_json(self, rel: str, data: dict[str, Any]) -> None:
        with self.fs.open(self.path(rel), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)

    def inside(self, rel: str) -> str:
        """Normalise a client-given folder path and check it stays inside the store and outside
        ``adapters/`` (the registry's own); returns it relative. Absolute paths, ``..``
        segments, URLs and missing folders are refused (400)."""
        if not rel or rel.startswith(("/", "\\")) or "://" in rel or "\x00" in rel:
            raise InvalidRequest("path must be relative to the artifact store", param="path")
        parts = rel.replace("\\", "/").split("/")
        if any(p == ".." for p in parts):
            raise InvalidRequest("path must not contain '..'", param="path")
        norm = posixpath.normpath("/".join(parts))
        if norm in (".", "") or norm.split("/")[0] == ADAPTERS_DIR:
            raise InvalidRequest("path must name a folder outside adapters/", param="path")
        if not self.fs.isdir(self.path(norm)):
            raise InvalidRequest(f"no folder {norm!r} in the artifact store", param="path")
        return norm

    def move_tree(self, src: str, dst: str) -> None:
        """Move the folder ``src`` to ``dst`` (see the module docstring)."""
        if self.is_local:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)
            return
        base = self.path(src)
        files = self.fs.find(base)
        for path in files:
            self.fs.copy(path, posixpath.join(self.path(dst), posixpath.relpath(path, base)))
        self.fs.rm(files)
        self.fs.invalidate_cache()

    def content_hash(self, rel: str) -> str:
        base = self.path(rel)
        files = sorted(p for p in self.fs.find(base) if not p.endswith("/" + MANIFEST_FILE))
        outer = hashlib.sha256()
        for p in files:
            inner = hashlib.sha256()
            with self.fs.open(p, "rb") as f:
                while block := f.read(1 << 20):  # 1 MiB blocks
                    inner.update(block)
            outer.update(posixpath.relpath(p, base).encode() + b"\0" + inner.digest())
        return outer.hexdigest()

    def upload(self, local_dir: Path, rel: str) -> None:
        """Replace the folder ``rel`` with the files of ``local_dir`` (not recursive)."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
        self.makedirs(rel)
        for p in sorted(local_dir.iterdir()):
            self.fs.put_file(str(p), posixpath.join(self.path(rel), p.name))

    def download(self, rel: str, dst: Path) -> Path:
        """``dst``, a local copy of the folder ``rel``, made once (see the module docstring)."""
        if (dst / MANIFEST_FILE).is_file():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            src = self.path(rel)
            for path in self.fs.find(src):
                local = tmp / posixpath.relpath(path, src)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(local))
            if dst.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dst
