"""The rule-based evaluator: label set, JSON schema, feedback label, tallies."""

from __future__ import annotations

from shared.quality import Rules, Tally, check, labels_of, schema_errors, score, valid_json

LABELS = Rules(labels=("fresh", "rotten"))


def test_rules_from_manifest() -> None:
    assert Rules.from_manifest({"eval": {"labels": ["fresh", "rotten"]}}).labels == (
        "fresh", "rotten")
    assert Rules.from_manifest({"metrics": {"scorer": "label_set:yes, no"}}).labels == (
        "yes", "no")
    schema = {"type": "object", "required": ["a"]}
    assert Rules.from_manifest({"eval": {"json_schema": schema}}).json_schema == schema
    assert Rules.from_manifest({}).empty


def test_labels_of_golden_answers() -> None:
    assert labels_of(["fresh", "Rotten", "fresh", "rotten."]) == ["Rotten", "fresh"]
    assert labels_of([f"answer {i}" for i in range(30)]) is None  # free text
    assert labels_of(["x" * 60]) is None


def test_label_set_and_feedback() -> None:
    assert check("Fresh.", LABELS) == {"in_label_set": True}
    assert score("I think it's rotten", LABELS) == 1.0
    assert score("no idea", LABELS) == 0.0
    assert score("fresh", LABELS, label="rotten") == 0.0
    assert score("fresh!", LABELS, label="Fresh") == 1.0
    assert score("anything", Rules()) is None  # nothing applies: not scored
    assert score("Paris", Rules(), label="paris.") == 1.0  # exact match without labels


def test_json_schema() -> None:
    schema = {"type": "object", "required": ["label", "score"], "additionalProperties": False,
              "properties": {"label": {"enum": ["pos", "neg"]}, "score": {"type": "number"}}}
    assert valid_json('{"label": "pos", "score": 0.5}', schema)
    assert valid_json('Sure: {"label": "neg", "score": 1}', schema)
    assert not valid_json('{"label": "meh", "score": 1}', schema)
    assert not valid_json('{"label": "pos"}', schema)
    assert not valid_json('{"label": "pos", "score": 1, "x": 2}', schema)
    assert not valid_json("not json", schema)
    assert schema_errors([1, "a"], {"type": "array", "items": {"type": "integer"}}) == [
        "$[1]: not integer"]
    assert score('{"label": "pos", "score": 2}', Rules(json_schema=schema)) == 1.0


def test_tally() -> None:
    t = Tally()
    t.add("fresh", LABELS, "fresh")
    t.add("rotten", LABELS, "fresh")
    t.add("fresh", LABELS)
    t.add("", LABELS, status=502)
    assert (t.n, t.requests, t.errors, t.labelled) == (3, 4, 1, 2)
    assert t.quality == 2 / 3 and t.accuracy == 0.5
    assert t.to_dict()["checks"] == {"in_label_set": 1.0, "label_match": 0.5}
