"""Storage settings common to every tunegate process: the data folder, the database, the artifact
store, and the files kept in the data folder. Each package adds its own settings class
(``engine.settings``, ``gateway.settings``, ...); only settings classes read the environment.

The gateway's and the trainer's settings classes extend :class:`StorageSettings`, so each of these
variables is read under one name by every process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The local admin key `tunegate up` makes once (mode 0600), read by `tunegate demo`, the engine's
# self-registration and the monitor's replays when no key is given.
LOCAL_KEY_FILE = "local-admin.key"
DB_FILE = "tunegate.db"  # the SQLite database in the data folder, when no URL is given


def default_data_dir() -> Path:
    """``~/.local/share/tunegate``: the data folder when ``TUNEGATE_DATA_DIR`` is unset."""
    return Path.home() / ".local" / "share" / "tunegate"


class StorageSettings(BaseSettings):
    """Where tunegate keeps models, adapters, records and logs."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_", extra="ignore",
                                      populate_by_name=True)

    data_dir: Path = Field(
        default_factory=default_data_dir,
        validation_alias=AliasChoices("data_dir", "TUNEGATE_DATA_DIR"),
        description="The data folder: models, the SQLite database, the local artifact store "
                    "(adapters, uploaded files), job folders, logs.")
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("database_url", "TUNEGATE_DATABASE_URL"),
        description="SQLAlchemy URL of the records (keys, adapters, jobs, traffic); "
                    "postgresql:// maps to psycopg 3. Unset: SQLite at <data_dir>/tunegate.db.")
    database_auto_migrate: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("database_auto_migrate", "TUNEGATE_DATABASE_AUTO_MIGRATE"),
        description="Whether a starting process upgrades a database whose schema is behind. "
        "Unset: SQLite yes (embedded), PostgreSQL no (the process refuses to start and says to "
        "run `tunegate db upgrade`); true: any backend, one process at a time under a lock; "
        "false: never.")
    artifact_store: str | None = Field(
        default=None, validation_alias=AliasChoices("artifact_store", "TUNEGATE_ARTIFACT_STORE"),
        description="Where adapter versions and uploaded files (files/) live: a local path or "
                    "an fsspec URL (s3://bucket/prefix). Unset: <data_dir>/artifacts.")
    artifact_store_options: dict[str, Any] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("artifact_store_options",
                                      "TUNEGATE_ARTIFACT_STORE_OPTIONS"),
        description='fsspec storage options as a JSON object, e.g. {"endpoint_url": '
                    '"http://minio:9000", "key": "...", "secret": "..."} (s3fs names; '
                    "credentials may also come from the usual AWS variables).")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def default_model_dir(self) -> Path:
        return self.models_dir / DEFAULT_MODEL_NAME

    @property
    def local_key_file(self) -> Path:
        return self.data_dir / LOCAL_KEY_FILE

    @property
    def db_url(self) -> str:
        return database_url(self.data_dir, self.database_url)

    @property
    def store_url(self) -> str:
        return self.artifact_store or str(self.data_dir / "artifacts")


def database_url(data_dir: Path, url: str | None = None) -> str:
    """The URL to use: ``url`` when given, else SQLite in ``data_dir``. A bare
    ``postgresql://`` URL is mapped to the psycopg 3 driver."""
    if url:
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url
    return f"sqlite:///{Path(data_dir) / DB_FILE}"
