"""Parity logic without engines: golden prompts from the trainer's JSONL, and the comparison."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.parity import Answer, compare, golden_prompts, resolve_adapter
from shared.data import write_jsonl


def test_golden_prompts_drop_the_expected_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"instruction": "Say hi", "output": "hi"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
    ])
    prompts = golden_prompts(path)
    assert prompts[0] == [{"role": "user", "content": "Say hi"}]
    assert [m["content"] for m in prompts[1]] == ["Be brief.", "Q1", "A1", "Q2"]
    assert golden_prompts(path, limit=1) == prompts[:1]


def test_compare_counts_first_tokens_and_sequences() -> None:
    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(4)]
    emb = [Answer(["a", "b"], "ab"), Answer(["a", "b"], "ab"), Answer(["x"], "x"),
           Answer([], "")]
    vll = [Answer(["a", "b"], "ab"), Answer(["a", "c"], "ac"), Answer(["y"], "y"),
           Answer([], "")]
    r = compare("base", prompts, emb, vll, max_tokens=2)
    assert r.prompts == 4
    assert r.first_token_agreement == pytest.approx(3 / 4)
    assert r.sequence_agreement == pytest.approx(2 / 4)
    assert [(d.index, d.first_token_agrees, d.prompt) for d in r.disagreements] == [
        (1, True, "p1"), (2, False, "p2")]
    assert r.to_dict()["disagreements"][0]["vllm"] == "ac"
    with pytest.raises(ValueError):
        compare("base", [], [], [], max_tokens=2)


def test_resolve_adapter_base_and_folder(tmp_path: Path) -> None:
    assert resolve_adapter("base") == ("base", None)
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    assert resolve_adapter(str(folder)) == ("parity-my-adapter", folder.resolve())


def test_resolve_adapter_from_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from shared.db import Database, database_url
    from shared.errors import ModelNotFound
    from shared.registry import Registry

    monkeypatch.setenv("TUNEGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TUNEGATE_DATABASE_URL", raising=False)
    monkeypatch.delenv("TUNEGATE_ARTIFACT_STORE", raising=False)
    reg = Registry(Database(database_url(tmp_path)), str(tmp_path / "artifacts"))
    src = Path(reg.store.root) / "staging" / "x"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 4}')
    v = reg.register_version("sent", "staging/x", {})
    name, path = resolve_adapter("sent@v1")
    assert name == v.ref == "sent@v1" and path is not None
    assert (path / "adapter_config.json").is_file()
    with pytest.raises(ModelNotFound):
        resolve_adapter("sent@v9")
