"""Settings common to every tunegate process. Each package adds its own settings class
(``engine.settings``, ``gateway.settings``, ...); only settings classes read the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_data_dir() -> Path:
    """``~/.local/share/tunegate``: the data folder when ``TUNEGATE_DATA_DIR`` is unset."""
    return Path.home() / ".local" / "share" / "tunegate"


class CommonSettings(BaseSettings):
    """Where tunegate keeps models, adapters, records and logs (``TUNEGATE_DATA_DIR``)."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def default_model_dir(self) -> Path:
        return self.models_dir / DEFAULT_MODEL_NAME
