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
  manifest is there is complete and never downloaded again. Given the version's
  ``content_hash``, the copy is hashed before the rename and refused when it differs.

Containment: nothing the store reads or writes leaves its root. On a local disk, a folder given
by a client must resolve (symlinks followed) inside the root, and a symlink anywhere in a folder
that is hashed, moved or uploaded is refused (it could point at any file on the machine). On an
object store, every key found under a folder must lie strictly under it (no ``..``, ``.`` or
empty segments), so a downloaded or moved file never lands outside its target folder.
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

from shared.errors import InvalidRequest, TunegateError

MANIFEST_FILE = "tunegate-manifest.json"
ADAPTERS_DIR = "adapters"
FILES_DIR = "files"  # uploaded files (``shared.file_objects``), one object each


class ArtifactCorrupt(TunegateError):
    """A downloaded version does not match its recorded content hash."""

    status = 502
    type = "upstream_error"


def _tree_hash(fs: Any, base: str, names: list[str]) -> str:
    """sha256 over the sorted ``(relative path, sha256 of file)`` pairs, the manifest excluded."""
    outer = hashlib.sha256()
    for name in sorted(n for n in names if n.rsplit("/", 1)[-1] != MANIFEST_FILE):
        inner = hashlib.sha256()
        with fs.open(posixpath.join(base, name), "rb") as f:
            while block := f.read(1 << 20):  # 1 MiB blocks
                inner.update(block)
        outer.update(name.encode() + b"\0" + inner.digest())
    return outer.hexdigest()


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

    def open(self, rel: str, mode: str = "rb") -> Any:
        """A file object of ``rel`` (fsspec's: written piece by piece, read in blocks)."""
        if "w" in mode and self.is_local:
            self.fs.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
        return self.fs.open(self.path(rel), mode)

    def write_json(self, rel: str, data: dict[str, Any]) -> None:
        with self.fs.open(self.path(rel), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)

    def _no_symlinks(self, rel: str) -> None:
        """Local stores: refuse ``rel`` when it, or anything in it, is a symlink or resolves
        outside the root (400)."""
        if not self.is_local:
            return
        root = os.path.realpath(self.root)
        top = self.path(rel)
        real = os.path.realpath(top)
        if os.path.islink(top) or (real != root and not real.startswith(root + os.sep)):
            raise InvalidRequest("path must stay inside the artifact store (no symlinks)",
                                 param="path")
        for cur, dirs, files in os.walk(top, followlinks=False):
            for entry in (*dirs, *files):
                if os.path.islink(os.path.join(cur, entry)):
                    raise InvalidRequest(f"{rel!r} contains a symlink ({entry!r}): refused",
                                         param="path")

    def _under(self, base: str, path: str) -> str:
        """``path``'s part below the folder ``base``, checked to stay strictly inside it."""
        if not path.startswith(base.rstrip("/") + "/"):
            raise InvalidRequest(f"object {path!r} is not inside {base!r}", param="path")
        rel = path[len(base.rstrip("/")) + 1:]
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
            raise InvalidRequest(f"object key {path!r} would leave its folder", param="path")
        return rel

    def inside(self, rel: str) -> str:
        """Normalise a client-given folder path and check it stays inside the store and outside
        ``adapters/`` and ``files/`` (the registry's and the uploads'); returns it relative.
        Absolute paths, ``..`` segments, URLs and missing folders are refused (400)."""
        if not rel or rel.startswith(("/", "\\")) or "://" in rel or "\x00" in rel:
            raise InvalidRequest("path must be relative to the artifact store", param="path")
        parts = rel.replace("\\", "/").split("/")
        if any(p == ".." for p in parts):
            raise InvalidRequest("path must not contain '..'", param="path")
        norm = posixpath.normpath("/".join(parts))
        if norm in (".", "") or norm.split("/")[0] in (ADAPTERS_DIR, FILES_DIR):
            raise InvalidRequest("path must name a folder outside adapters/ and files/",
                                 param="path")
        if not self.fs.isdir(self.path(norm)):
            raise InvalidRequest(f"no folder {norm!r} in the artifact store", param="path")
        self._no_symlinks(norm)
        return norm

    def move_tree(self, src: str, dst: str) -> None:
        """Move the folder ``src`` to ``dst`` (see the module docstring)."""
        if self.is_local:
            self._no_symlinks(src)
            self.fs.mv(self.path(src), self.path(dst), recursive=True)
            return
        base = self.path(src)
        files = self.fs.find(base)
        for path in files:
            self.fs.copy(path, posixpath.join(self.path(dst), self._under(base, path)))
        self.fs.rm(files)
        self.fs.invalidate_cache()

    def content_hash(self, rel: str) -> str:
        self._no_symlinks(rel)
        base = self.path(rel)
        return _tree_hash(self.fs, base, [self._under(base, p) for p in self.fs.find(base)])

    def upload(self, local_dir: Path, rel: str) -> None:
        """Replace the folder ``rel`` with the files of ``local_dir`` (not recursive; a symlink
        in it is refused: it could point at any file on the machine)."""
        entries = sorted(local_dir.iterdir())
        links = [p.name for p in entries if p.is_symlink()]
        if links:
            raise InvalidRequest(f"{local_dir} contains symlinks {links}: refused", param="path")
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
        self.makedirs(rel)
        for p in entries:
            self.fs.put_file(str(p), posixpath.join(self.path(rel), p.name))

    def download(self, rel: str, dst: Path, content_hash: str | None = None) -> Path:
        """``dst``, a local copy of the folder ``rel``, made once (see the module docstring);
        with ``content_hash`` the copy must hash to it (else ``ArtifactCorrupt``, nothing kept)."""
        if (dst / MANIFEST_FILE).is_file():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            src = self.path(rel)
            names = [self._under(src, path) for path in self.fs.find(src)]
            for name in names:
                local = tmp / name
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(posixpath.join(src, name), str(local))
            if content_hash is not None:
                got = _tree_hash(fsspec.filesystem("file"), str(tmp), names)
                if got != content_hash:
                    raise ArtifactCorrupt(f"{rel}: downloaded content hashes to {got[:12]}..., "
                                          f"the registry recorded {content_hash[:12]}...")
            if dst.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dst
