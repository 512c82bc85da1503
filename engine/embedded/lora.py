"""LoRA adapters on a replica: validation before loading, and the bounded resident set.

Validation rules (answered with 400 when an adapter does not fit):

- ``lora_path`` must be a folder holding ``adapter_config.json`` (404 ``NotFoundError``
  otherwise, with vLLM's message);
- ``peft_type`` must be ``LORA``;
- the base model must match, leniently: the last path component of the adapter's
  ``base_model_name_or_path`` must equal the served base model's folder name or served name
  (case-insensitive; ``org/SmolLM2-135M-Instruct`` and ``/data/models/SmolLM2-135M-Instruct`` both
  match ``SmolLM2-135M-Instruct``). An adapter that records no base model is accepted;
- ``r`` must be at most ``max_lora_rank``;
- every target module must exist in the model (a list names module suffixes; a string is a regex
  that must match at least one module name), and weights must be present.

At most ``max_loras`` adapters are resident; loading one more first unloads the least recently
used one that no waiting or running request needs (503 when every resident adapter is busy).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BadRequestError, EngineBusy, InvalidUserInput, NotFoundError

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    rank: int
    key: str  # the runner's key for this adapter (never reused)
    created: int  # unix seconds, reported in /v1/models

    @property
    def key_number(self) -> int:
        """Keys count up from ``a0`` as adapters load, so they order by load time."""
        digits = "".join(c for c in self.key if c.isdigit())
        return int(digits or 0)


def _base_names(base: str) -> set[str]:
    return {Path(base.rstrip("/")).name.lower()} if base else set()


def validate_adapter(name: str, path: Path, *, base_names: Iterable[str], max_rank: int,
                     module_names: set[str]) -> dict[str, Any]:
    """Check an adapter folder against the rules in the module doc; returns its config."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise NotFoundError(f"Loading lora {name} failed: No adapter found for {path}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise BadRequestError(f"Unreadable adapter_config.json in {path}: {exc}",
                              param="lora_path") from exc
    if not isinstance(cfg, dict):
        raise BadRequestError(f"adapter_config.json in {path} is not an object", param="lora_path")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise BadRequestError(f"Adapter at {path} is not a LoRA adapter "
                              f"(peft_type {cfg.get('peft_type')!r})", param="lora_path")
    base = cfg.get("base_model_name_or_path") or ""
    wanted = {n.lower() for n in base_names}
    if base and not (_base_names(str(base)) & wanted):
        raise BadRequestError(
            f"Adapter at {path} was trained for base model {base!r}, but this replica serves "
            f"{sorted(wanted)}", param="lora_path")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise BadRequestError(f"Adapter at {path} has no valid rank `r`", param="lora_path")
    if rank > max_rank:
        raise BadRequestError(
            f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.", param="lora_path")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in module_names):
            raise BadRequestError(f"Adapter target_modules {targets!r} match no module of the "
                                  "base model", param="lora_path")
    elif isinstance(targets, list) and targets:
        suffixes = {m.rsplit(".", 1)[-1] for m in module_names} | module_names
        missing = [t for t in targets if t not in suffixes]
        if missing:
            raise BadRequestError(f"Adapter target modules {missing} do not exist in the base "
                                  "model", param="lora_path")
    else:
        raise BadRequestError(f"Adapter at {path} names no target_modules", param="lora_path")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise BadRequestError(f"No adapter weights ({' or '.join(WEIGHT_FILES)}) in {path}",
                              param="lora_path")
    return cfg


class AdapterSet:
    """The resident adapters in least-recently-used order (oldest first)."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._lru: OrderedDict[str, AdapterInfo] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def list(self) -> list[AdapterInfo]:
        """In load order, as vLLM lists them."""
        return sorted(self._lru.values(), key=lambda a: a.key_number)

    def get(self, name: str) -> AdapterInfo | None:
        return self._lru.get(name)

    def touch(self, name: str) -> None:
        if name in self._lru:
            self._lru.move_to_end(name)

    def check_new(self, name: str) -> None:
        if name in self._lru:
            raise InvalidUserInput(f"The lora adapter '{name}' has already been loaded.")

    def victim(self, in_use: set[str]) -> str | None:
        """The adapter to unload before adding one more (None when there is room)."""
        if len(self._lru) < self.max_loras:
            return None
        for name in self._lru:
            if name not in in_use:
                return name
        raise EngineBusy(f"All {self.max_loras} resident LoRA adapters are in use; "
                         "retry when a request finishes")

    def add(self, info: AdapterInfo) -> None:
        self._lru[info.name] = info

    def remove(self, name: str) -> AdapterInfo:
        if name not in self._lru:
            raise NotFoundError(f"The lora adapter '{name}' cannot be found.")
        return self._lru.pop(name)
