"""The adapter registry: immutable versions, manifests, aliases with history and rollback.

API (everything else here is internal)::

    reg = Registry(db, store)                      # store: a local path or an fsspec URL
    v = reg.register_version("sentiment", "staging/job-1", {"base_model": ...})
    v.ref                                           # "sentiment@v3"
    reg.set_alias("sentiment", "stable", v.version, reason="gate passed")
    reg.rollback("sentiment", "stable")             # back to where stable pointed before
    reg.resolve("sentiment:canary")                 # -> ResolvedModel
    reg.list_adapters(); reg.get_adapter(name); reg.get_version(name, n); reg.alias_history(name)

Rules:

- A version ``NAME@vN`` is immutable. Its files live at ``<store>/adapters/NAME/vN`` with
  ``tunegate-manifest.json`` written last; its ``content_hash`` is the sha256 over the sorted
  ``(relative path, sha256 of file)`` pairs (the manifest excluded). Registering content equal
  to an existing version of the same name returns that version and moves nothing. The files go
  through ``reg.store``, an ``ArtifactStore`` (``shared.artifact_store``); this module keeps the
  records (SQL).
- ``register_version`` takes a folder *inside the store* (a relative path without ``..``); the
  folder is moved (renamed) into place, so callers write to a temporary folder first and a
  partial artifact never appears under ``adapters/``.
- Every registration moves the ``latest`` alias. ``stable`` and ``canary`` move only by
  ``set_alias`` (the trainer's gate, the promotion loop, an operator).
- Model names: ``base``; ``NAME`` (= ``NAME:stable``); ``NAME:ALIAS``; ``NAME@vN`` (or ``NAME@N``).
- Stores: a local folder, or an S3-compatible bucket through fsspec/s3fs (``StorageSettings``:
  ``TUNEGATE_ARTIFACT_STORE=s3://bucket/prefix`` and ``TUNEGATE_ARTIFACT_STORE_OPTIONS`` with
  the endpoint and credentials). Engines load adapters from a local folder: ``materialize``
  downloads a version once into a local cache (versions are immutable, so the copy never goes
  stale); ``path`` of a remote version is its ``s3://`` URL, not something to hand to an engine.
- ``rollback`` undoes the most recent move of the alias that has not been undone already, so
  repeated rollbacks walk further back through the history; each rollback is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from shared.artifact_store import ADAPTERS_DIR, MANIFEST_FILE, ArtifactStore
from shared.db import Adapter, AdapterVersion, Alias, AliasEvent, Database, utcnow
from shared.errors import Conflict, InvalidRequest, ModelNotFound, NotFound
from shared.settings import StorageSettings

BASE = "base"
ALIASES = ("latest", "stable", "canary")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^v?([0-9]{1,9})$")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    content_hash: str
    artifact: str  # relative to the store root
    path: str  # absolute: what an engine gets as ``lora_path``
    manifest: dict[str, Any]
    created_at: str

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.ref, "name": self.name, "version": self.version,
                "content_hash": self.content_hash, "artifact": self.artifact, "path": self.path,
                "manifest": self.manifest, "created_at": self.created_at}


@dataclass(frozen=True)
class ResolvedModel:
    """What a model name means now: the base model, or one immutable adapter version."""

    requested: str
    name: str  # "base" or the adapter name
    version: int | None = None
    path: str | None = None  # the artifact folder for engines (``lora_path``)

    @property
    def is_base(self) -> bool:
        return self.version is None

    @property
    def ref(self) -> str:
        """``base`` or ``NAME@vN``: the ``lora_name`` on engines and the ``model`` in answers."""
        return BASE if self.version is None else f"{self.name}@v{self.version}"


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name) or name == BASE:
        raise InvalidRequest(
            f"invalid adapter name {name!r}: 1-64 of letters, digits, '.', '_', '-', "
            f"starting with a letter or digit, and not {BASE!r}", param="name")
    return name


def parse_model_name(model: str) -> tuple[str, str | None, int | None]:
    """``(name, alias, version)`` for a model name; ``NAME`` means its ``stable`` alias."""
    if "@" in model:
        name, _, ver = model.partition("@")
        m = _VERSION_RE.match(ver)
        if not m or not _NAME_RE.match(name):
            raise ModelNotFound(model)
        return name, None, int(m.group(1))
    if ":" in model:
        name, _, alias = model.partition(":")
        if not _NAME_RE.match(name) or not alias:
            raise ModelNotFound(model)
        return name, alias, None
    if not _NAME_RE.match(model):
        raise ModelNotFound(model)
    return model, "stable", None


class Registry:
    def __init__(self, db: Database, store: str,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.db = db
        self.store = ArtifactStore(store, storage_options)
        self.store.makedirs(ADAPTERS_DIR)

    @classmethod
    def from_settings(cls, db: Database, settings: StorageSettings | None = None) -> Registry:
        """The registry at ``TUNEGATE_ARTIFACT_STORE`` with ``TUNEGATE_ARTIFACT_STORE_OPTIONS``
        (``shared.settings.StorageSettings``)."""
        settings = settings or StorageSettings()
        return cls(db, settings.store_url, storage_options=settings.artifact_store_options)

    # ---- artifacts -------------------------------------------------------------------------
    def materialize(self, model: str, cache_dir: str | Path) -> Path:
        """A local folder holding the version ``model`` names (what engines need to load it).
        Local stores give the artifact folder itself; remote ones (S3, ...) download it once into
        ``cache_dir/adapters/NAME/vN``: versions are immutable, so a cached copy never goes
        stale."""
        resolved = self.resolve(model)
        if resolved.is_base:
            raise InvalidRequest("the base model has no adapter artifact", param="model")
        info = self.get_version(resolved.name, resolved.version or 0)
        if self.store.is_local:
            return Path(self.store.path(info.artifact))
        return self.store.download(info.artifact, Path(cache_dir) / info.artifact,
                                   content_hash=info.content_hash)

    # ---- versions ----------------------------------------------------------------------------
    def register_version(self, name: str, src: str, manifest: dict[str, Any]) -> VersionInfo:
        """Move the folder ``src`` (relative to the store) into place as the next version of
        ``name`` and record it with ``manifest``; moves ``latest``. Idempotent on content.

        Safe across processes (PostgreSQL and SQLite): the version number comes from one atomic
        counter update (:meth:`_allocate`), so no two registrations ever share a number or a
        destination folder; the row is committed only after the files are in place, and a
        folder is never renamed once a row may point at it."""
        validate_name(name)
        src = self.store.inside(src)
        digest = self.store.content_hash(src)
        with self.db.session() as s:
            same = s.scalars(select(AdapterVersion).where(
                AdapterVersion.name == name, AdapterVersion.content_hash == digest)).first()
            if same is not None:
                return self._info(same)
        for _attempt in range(5):
            n = self._allocate(name)
            dst = f"{ADAPTERS_DIR}/{name}/v{n}"
            if self.store.exists(dst):
                # Left by a crash between move and commit in an older release: the number is
                # skipped, the folder left alone for an operator to look at.
                continue
            self.store.makedirs(f"{ADAPTERS_DIR}/{name}")
            self.store.move_tree(src, dst)
            full = {**manifest, "name": name, "version": n, "content_hash": digest}
            self.store.write_json(f"{dst}/{MANIFEST_FILE}", full)
            try:
                with self.db.session() as s:
                    row = AdapterVersion(name=name, version=n, content_hash=digest,
                                         artifact=dst, manifest=full)
                    s.add(row)
                    s.flush()
                    self._move_alias(s, name, "latest", n, "set", "registered")
                    info = self._info(row)
                return info
            except IntegrityError:
                # A row with this number from before the counter existed: put the folder (ours
                # alone: the number was allocated to this call) back and take the next number.
                self.store.remove(f"{dst}/{MANIFEST_FILE}")
                self.store.move_tree(dst, src)
        raise Conflict(f"could not allocate a version for {name!r}; retry")

    def _allocate(self, name: str) -> int:
        """The next version number of ``name``, unique across processes: one committed
        ``UPDATE adapters SET next_version = next_version + 1`` (the row lock on PostgreSQL, the
        write lock on SQLite serialize concurrent callers). The write comes first in its
        transaction, so SQLite never has to upgrade a read snapshot. Numbers of registrations
        that fail later are not reused."""
        for _attempt in range(3):
            with self.db.session() as s:
                bumped = s.execute(update(Adapter).where(Adapter.name == name)
                                   .values(next_version=Adapter.next_version + 1))
                if not bumped.rowcount:  # type: ignore[attr-defined]
                    try:
                        with s.begin_nested():
                            s.add(Adapter(name=name, next_version=1))
                    except IntegrityError:  # created by another process meanwhile: bump it
                        continue
                n = int(s.scalar(select(Adapter.next_version).where(Adapter.name == name)) or 1)
                # Databases from before the counter: never hand out a number already used.
                top = s.scalar(select(func.max(AdapterVersion.version))
                               .where(AdapterVersion.name == name)) or 0
                if n <= top:
                    n = top + 1
                    s.execute(update(Adapter).where(Adapter.name == name)
                              .values(next_version=n))
                return n
        raise Conflict(f"could not allocate a version for {name!r}; retry")

    def get_version(self, name: str, version: int) -> VersionInfo:
        with self.db.session() as s:
            row = s.scalars(select(AdapterVersion).where(
                AdapterVersion.name == name, AdapterVersion.version == version)).first()
            if row is None:
                raise NotFound(f"no version {name}@v{version}", param="version")
            return self._info(row)

    def _info(self, row: AdapterVersion) -> VersionInfo:
        return VersionInfo(name=row.name, version=row.version, content_hash=row.content_hash,
                           artifact=row.artifact, path=self.store.public_path(row.artifact),
                           manifest=dict(row.manifest or {}), created_at=row.created_at.isoformat())

    # ---- adapters ----------------------------------------------------------------------------
    def list_adapters(self) -> list[dict[str, Any]]:
        """Every name with its version count and current aliases."""
        with self.db.session() as s:
            names = s.scalars(select(Adapter.name).order_by(Adapter.name)).all()
            counts = dict(s.execute(select(AdapterVersion.name, func.count())
                                    .group_by(AdapterVersion.name)).all())
            aliases: dict[str, dict[str, int]] = {}
            for a in s.scalars(select(Alias)):
                aliases.setdefault(a.name, {})[a.alias] = a.version
        return [{"name": n, "versions": counts.get(n, 0), "aliases": aliases.get(n, {})}
                for n in names]

    def get_adapter(self, name: str) -> dict[str, Any]:
        with self.db.session() as s:
            if s.get(Adapter, name) is None:
                raise NotFound(f"no adapter {name!r}", param="name")
            rows = s.scalars(select(AdapterVersion).where(AdapterVersion.name == name)
                             .order_by(AdapterVersion.version)).all()
            aliases = {a.alias: a.version for a in
                       s.scalars(select(Alias).where(Alias.name == name))}
            versions = [self._info(r).to_dict() for r in rows]
        return {"name": name, "aliases": aliases, "versions": versions}

    # ---- aliases -----------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int, reason: str | None = None) -> None:
        """Point ``NAME:alias`` at version ``version`` (which must exist)."""
        _check_alias(alias)
        with self.db.session() as s:
            exists = s.scalar(select(func.count()).select_from(AdapterVersion).where(
                AdapterVersion.name == name, AdapterVersion.version == version))
            if not exists:
                raise NotFound(f"no version {name}@v{version}", param="version")
            self._move_alias(s, name, alias, version, "set", reason)

    def rollback(self, name: str, alias: str = "stable", reason: str | None = None) -> int:
        """Move ``alias`` back to the version it held before its last (not yet undone) move;
        returns that version. 409 when there is nothing to roll back to."""
        _check_alias(alias)
        with self.db.session() as s:
            events = s.scalars(select(AliasEvent).where(
                AliasEvent.name == name, AliasEvent.alias == alias).order_by(AliasEvent.id)).all()
            stack: list[int | None] = []
            for e in events:
                if e.kind == "rollback":
                    if stack:
                        stack.pop()
                else:
                    stack.append(e.from_version)
            if not stack or stack[-1] is None:
                raise Conflict(f"{name}:{alias} has no earlier version to roll back to")
            target = stack[-1]
            assert target is not None
            self._move_alias(s, name, alias, target, "rollback", reason)
            return target

    def alias_history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        with self.db.session() as s:
            q = select(AliasEvent).where(AliasEvent.name == name)
            if alias:
                q = q.where(AliasEvent.alias == alias)
            return [{"alias": e.alias, "from_version": e.from_version,
                     "to_version": e.to_version, "kind": e.kind, "reason": e.reason,
                     "at": e.at.isoformat()} for e in s.scalars(q.order_by(AliasEvent.id))]

    def _move_alias(self, s: Any, name: str, alias: str, version: int, kind: str,
                    reason: str | None) -> None:
        row = s.get(Alias, (name, alias))
        before = row.version if row is not None else None
        if row is None:
            s.add(Alias(name=name, alias=alias, version=version))
        else:
            row.version = version
            row.updated_at = utcnow()
        s.add(AliasEvent(name=name, alias=alias, from_version=before, to_version=version,
                         kind=kind, reason=reason))

    # ---- resolution --------------------------------------------------------------------------
    def resolve(self, model: str) -> ResolvedModel:
        """The immutable thing a model name means now; ``ModelNotFound`` (404) otherwise."""
        if model == BASE:
            return ResolvedModel(requested=model, name=BASE)
        name, alias, version = parse_model_name(model)
        with self.db.session() as s:
            if alias is not None:
                row = s.get(Alias, (name, alias))
                if row is None:
                    raise ModelNotFound(model)
                version = row.version
            v = s.scalars(select(AdapterVersion).where(
                AdapterVersion.name == name, AdapterVersion.version == version)).first()
            if v is None:
                raise ModelNotFound(model)
            return ResolvedModel(requested=model, name=name, version=v.version,
                                 path=self.store.public_path(v.artifact))

    def alias_targets(self) -> set[str]:
        """``NAME@vN`` of every version some alias points at now (what replicas should keep)."""
        with self.db.session() as s:
            return {f"{a.name}@v{a.version}" for a in s.scalars(select(Alias))}

    def served_names(self) -> list[tuple[str, list[str]]]:
        """``(name, [aliases])`` for every adapter that has at least one alias."""
        with self.db.session() as s:
            out: dict[str, list[str]] = {}
            for a in s.scalars(select(Alias).order_by(Alias.name, Alias.alias)):
                out.setdefault(a.name, []).append(a.alias)
        return sorted(out.items())


def _check_alias(alias: str) -> None:
    if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", alias):
        raise InvalidRequest(f"invalid alias {alias!r}", param="alias")
