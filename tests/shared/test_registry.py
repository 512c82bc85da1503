"""The adapter registry on SQLite and a local artifact store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.db import Database
from shared.errors import Conflict, InvalidRequest, ModelNotFound, NotFound
from shared.registry import MANIFEST_FILE, Registry, parse_model_name


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"), str(tmp_path / "store"))


def stage(reg: Registry, rel: str, payload: str) -> str:
    d = Path(reg.store.root) / rel
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (d / "adapter_model.safetensors").write_text(payload)
    return rel


def test_register_moves_folder_writes_manifest_and_sets_latest(reg: Registry) -> None:
    v1 = reg.register_version("sent", stage(reg, "staging/a", "one"), {"rank": 8})
    assert v1.ref == "sent@v1"
    assert not (Path(reg.store.root) / "staging/a").exists()
    manifest = json.loads((Path(v1.path) / MANIFEST_FILE).read_text())
    assert manifest["rank"] == 8 and manifest["version"] == 1
    assert manifest["content_hash"] == v1.content_hash
    v2 = reg.register_version("sent", stage(reg, "staging/b", "two"), {})
    assert v2.version == 2 and v2.content_hash != v1.content_hash
    assert reg.resolve("sent:latest").ref == "sent@v2"
    with pytest.raises(ModelNotFound):
        reg.resolve("sent")  # no stable yet


def test_same_content_is_the_same_version(reg: Registry) -> None:
    v1 = reg.register_version("sent", stage(reg, "staging/a", "same"), {})
    again = reg.register_version("sent", stage(reg, "staging/b", "same"), {})
    assert again.ref == v1.ref
    assert (Path(reg.store.root) / "staging/b").exists()  # left where it was


@pytest.mark.parametrize("bad", ["/etc", "../outside", "staging/../../x", "s3://bucket/x",
                                 "adapters/sent/v1", "", "missing/folder"])
def test_paths_outside_the_store_are_refused(reg: Registry, bad: str) -> None:
    with pytest.raises(InvalidRequest):
        reg.register_version("sent", bad, {})


def test_invalid_names_are_refused(reg: Registry) -> None:
    for name in ["base", "a/b", "a@b", "a:b", "", "-x"]:
        with pytest.raises(InvalidRequest):
            reg.register_version(name, stage(reg, f"staging/{abs(hash(name))}", name), {})


def test_aliases_resolution_and_rollback_walk_back(reg: Registry) -> None:
    for i in range(1, 4):
        reg.register_version("sent", stage(reg, f"staging/{i}", f"w{i}"), {})
        reg.set_alias("sent", "stable", i, reason=f"promote {i}")
    assert reg.resolve("sent").ref == "sent@v3"
    assert reg.resolve("sent:stable").ref == "sent@v3"
    assert reg.resolve("sent@v1").ref == "sent@v1"
    assert reg.resolve("sent@2").ref == "sent@v2"
    assert reg.rollback("sent", "stable") == 2
    assert reg.resolve("sent").ref == "sent@v2"
    assert reg.rollback("sent", "stable") == 1
    with pytest.raises(Conflict):
        reg.rollback("sent", "stable")
    reg.set_alias("sent", "stable", 3)
    assert reg.rollback("sent") == 1  # undoes the last move, back to where it was
    history = reg.alias_history("sent", "stable")
    assert [h["kind"] for h in history].count("rollback") == 3
    assert history[-1] == {**history[-1], "from_version": 3, "to_version": 1}


def test_unknown_names_and_versions(reg: Registry) -> None:
    reg.register_version("sent", stage(reg, "staging/a", "x"), {})
    for model in ["nope", "sent@v9", "sent:canary", "sent@vx", "a b", "x:"]:
        with pytest.raises(ModelNotFound):
            reg.resolve(model)
    with pytest.raises(NotFound):
        reg.set_alias("sent", "stable", 7)
    with pytest.raises(InvalidRequest):
        reg.set_alias("sent", "Bad Alias", 1)
    assert reg.resolve("base").is_base


def test_listing(reg: Registry) -> None:
    reg.register_version("b-one", stage(reg, "staging/a", "x"), {"k": 1})
    reg.register_version("a-two", stage(reg, "staging/b", "y"), {})
    reg.set_alias("a-two", "stable", 1)
    names = [a["name"] for a in reg.list_adapters()]
    assert names == ["a-two", "b-one"]
    detail = reg.get_adapter("b-one")
    assert detail["aliases"] == {"latest": 1}
    assert detail["versions"][0]["manifest"]["k"] == 1
    assert dict(reg.served_names())["a-two"] == ["latest", "stable"]
    with pytest.raises(NotFound):
        reg.get_adapter("zzz")


def test_parse_model_name() -> None:
    assert parse_model_name("x") == ("x", "stable", None)
    assert parse_model_name("x:canary") == ("x", "canary", None)
    assert parse_model_name("x@v12") == ("x", None, 12)
