"""Downloads from an S3-compatible store (a real moto server) stay inside their target folder and
are checked against the registry's content hash: an object key with ``..`` segments under a
version's folder is refused, and a version whose files changed in the bucket is not served."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.artifact_store import ArtifactCorrupt
from shared.errors import InvalidRequest
from shared.registry import Registry
from tests.shared.test_registry_s3 import reg, s3_endpoint, stage  # noqa: F401 (fixtures)


def test_a_key_that_climbs_out_is_refused(reg: Registry, tmp_path: Path) -> None:  # noqa: F811
    v1 = reg.register_version("sent", stage(reg, "staging/a", "one"), {})
    # Someone with write access to the bucket adds a key that climbs out of the folder.
    reg.store.fs.pipe({f"{reg.store.root}/{v1.artifact}/../../../../../escaped": b"x"})
    reg.store.fs.invalidate_cache()
    cache = tmp_path / "cache" / "deep" / "er"
    with pytest.raises(InvalidRequest):
        reg.materialize("sent@v1", cache)
    assert not list(tmp_path.rglob("escaped"))
    assert not (cache / v1.artifact).exists()


def test_a_changed_version_is_not_served(reg: Registry, tmp_path: Path) -> None:  # noqa: F811
    v1 = reg.register_version("sent", stage(reg, "staging/a", "one"), {})
    reg.store.fs.pipe({f"{reg.store.root}/{v1.artifact}/adapter_model.safetensors": b"evil"})
    reg.store.fs.invalidate_cache()
    with pytest.raises(ArtifactCorrupt):
        reg.materialize("sent@v1", tmp_path / "cache")
    assert not (tmp_path / "cache" / v1.artifact).exists()
    # Put right, it downloads and matches.
    reg.store.fs.pipe({f"{reg.store.root}/{v1.artifact}/adapter_model.safetensors": b"one"})
    reg.store.fs.invalidate_cache()
    local = reg.materialize("sent@v1", tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_text() == "one"
