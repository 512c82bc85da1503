from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.data import DatasetRejected, load_examples, validate_file, validate_lines


def good(i: int) -> str:
    return json.dumps({"instruction": "Classify the review.", "input": f"review {i}",
                       "output": "fresh" if i % 2 else "rotten"})


def write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


BAD = '{"instruction": "x", "output": '  # invalid JSON


def test_three_percent_invalid_is_rejected_with_line_level_report(tmp_path: Path) -> None:
    lines = [good(i) for i in range(100)]
    for n in (10, 50, 90):
        lines[n - 1] = BAD
    path = write(tmp_path, lines)
    with pytest.raises(DatasetRejected) as err:
        load_examples(path)
    assert err.value.status == 400
    assert err.value.report.invalid_lines == [10, 50, 90]
    msg = err.value.message
    assert "3 of 100 lines invalid" in msg
    for n in (10, 50, 90):
        assert f"line {n}: invalid JSON" in msg
    assert err.value.to_dict()["error"]["code"] == "invalid_training_file"


def test_one_percent_invalid_passes_with_bad_lines_listed(tmp_path: Path) -> None:
    lines = [good(i) for i in range(100)]
    lines[41] = json.dumps({"instruction": "Classify.", "output": "   "})
    report = validate_file(write(tmp_path, lines))
    assert report.accepted
    assert len(report.examples) == 99
    assert [(i.line, i.field) for i in report.issues] == [(42, "output")]
    assert "empty or whitespace" in report.issues[0].reason
    assert 42 not in [e.line for e in report.examples]


def test_threshold_is_configurable(tmp_path: Path) -> None:
    lines = [good(i) for i in range(100)]
    lines[0] = BAD
    path = write(tmp_path, lines)
    assert validate_file(path).accepted
    assert not validate_file(path, max_invalid_fraction=0.0).accepted


def reasons(lines: list[str], **kw: object) -> list[tuple[int, str, str]]:
    report = validate_lines(lines, max_invalid_fraction=1.0, **kw)  # type: ignore[arg-type]
    return [(i.line, i.field, i.reason) for i in report.issues]


def test_each_reason() -> None:
    chat = lambda msgs: json.dumps({"messages": msgs})  # noqa: E731
    lines = [
        good(0),
        "not json",
        json.dumps({"instruction": " ", "output": "ok"}),
        json.dumps({"instruction": "Do it", "output": "x" * 513}),
        chat([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]),
        good(0),
        chat([{"role": "user", "content": "hi"}]),
        json.dumps({"instruction": "Do it"}),
        json.dumps([1, 2]),
        chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]),
        json.dumps({"instruction": "Do it", "output": "y", "extra": 1}),
        chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}]),
    ]
    got = reasons(lines)
    by_line = {line: (f, r) for line, f, r in got}
    assert by_line[2][1].startswith("invalid JSON")
    assert by_line[3] == ("instruction", "must not be empty or whitespace")
    assert by_line[4] == ("output", "output is 513 characters; at most 512")
    assert by_line[5][0] == "messages.1.role" and "bad role 'robot'" in by_line[5][1]
    assert by_line[6] == ("", "exact duplicate of line 1")
    assert "must end with an assistant message" in by_line[7][1]
    assert by_line[8] == ("output", "required field missing")
    assert by_line[9] == ("", "a line must be a JSON object")
    assert by_line[10][0] == "messages.1.content"
    assert by_line[11] == ("extra", "unknown field")
    assert 1 not in by_line and 12 not in by_line


def test_output_limit_configurable_and_token_length_checked() -> None:
    line = json.dumps({"instruction": "Summarise", "output": "word " * 30})
    assert reasons([line], max_output_chars=100)[0][2].startswith("output is 150 characters")
    long = reasons([line], count_tokens=lambda many: [40] * len(many), max_seq_length=32)
    assert long == [(1, "", "40 tokens once templated; max_seq_length is 32")]
    assert reasons([line], count_tokens=lambda many: [20] * len(many), max_seq_length=32) == []


def test_tokens_counted_in_chunks_keep_the_line_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lengths are counted a chunk of records at a time; the report reads as if one by one."""
    import shared.data as data

    monkeypatch.setattr(data, "COUNT_CHUNK", 3)
    calls: list[int] = []

    def count(many: list[list[dict[str, str]]]) -> list[int]:
        calls.append(len(many))
        return [len(m[0]["content"]) for m in many]  # characters stand in for tokens

    lines = [json.dumps({"instruction": "x" * (40 if i % 4 == 1 else 5) + str(i), "output": "y"})
             for i in range(10)]
    lines[6] = "{not json"
    report = validate_lines(lines, count_tokens=count, max_seq_length=32)
    assert calls == [3, 3, 3]  # nine records reach the count, the bad JSON does not
    assert [i.line for i in report.issues] == [2, 6, 7, 10]
    assert report.issues[1].reason.startswith("41 tokens once templated")
    assert [e.line for e in report.examples] == [1, 3, 4, 5, 8, 9]
    assert report.valid == 6 and report.total == 10


def test_seed_shape_becomes_chat_messages_and_blank_lines_are_skipped() -> None:
    report = validate_lines(["", good(1), "   ", json.dumps({"instruction": "Hi", "output": "Yo"})])
    assert report.total == 2 and report.accepted
    assert report.examples[0].messages == [
        {"role": "user", "content": "Classify the review.\n\nreview 1"},
        {"role": "assistant", "content": "fresh"},
    ]
    assert report.examples[1].messages[0]["content"] == "Hi"
    assert report.examples[1].line == 4


def test_empty_file_is_rejected() -> None:
    report = validate_lines([])
    assert not report.accepted
    with pytest.raises(DatasetRejected):
        report.raise_if_rejected()
