"""Training data: JSONL in the seed's shape ``{instruction, input?, output}`` or OpenAI's chat shape
``{messages: [...]}``, validated line by line.

Every record becomes a list of chat messages (the seed shape turns into one user turn and one
assistant turn). Validation never stops at the first problem: it collects one :class:`LineIssue`
per bad line (line number, field, reason) into a :class:`ValidationReport`, and the file is
rejected when more than ``max_invalid_fraction`` of its records are bad, with the report as the
error. Token lengths are checked only when a ``count_tokens`` function (see
``shared.chat.count_tokens_many``) is given, so this module needs no tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from shared.errors import InvalidRequest

Message = dict[str, str]
Role = Literal["system", "user", "assistant"]

DEFAULT_MAX_OUTPUT_CHARS = 512
DEFAULT_MAX_INVALID_FRACTION = 0.02


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


class InstructionRecord(BaseModel):
    """The seed's shape. ``input`` is optional context appended to the instruction."""

    model_config = ConfigDict(extra="forbid", strict=True)

    instruction: str
    input: str | None = None
    output: str

    _blank_instruction = field_validator("instruction")(_not_blank)
    _blank_output = field_validator("output")(_not_blank)

    @field_validator("input")
    @classmethod
    def _blank_input(cls, value: str | None) -> str | None:
        # An absent input is fine; a present one must say something.
        if value is not None and value != "" and not value.strip():
            raise ValueError("must not be whitespace only (omit it instead)")
        return value or None

    def to_messages(self) -> list[Message]:
        user = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.output}]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Role
    content: str

    _blank_content = field_validator("content")(_not_blank)


class ChatRecord(BaseModel):
    """OpenAI's chat fine-tuning shape: optional system turn, then user/assistant turns, ending
    with an assistant turn (the answer the loss is computed on)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[ChatMessage]

    @model_validator(mode="after")
    def _order(self) -> ChatRecord:
        roles = [m.role for m in self.messages]
        if not roles:
            raise ValueError("must contain at least a user and an assistant message")
        if "system" in roles[1:]:
            raise ValueError("a system message may only come first")
        turns = roles[1:] if roles[0] == "system" else roles
        if not turns or turns[-1] != "assistant":
            raise ValueError("must end with an assistant message")
        for i, role in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"roles must alternate user/assistant; turn {i} is {role!r}")
        return self

    def to_messages(self) -> list[Message]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True)
class LineIssue:
    line: int  # 1-based line number in the file
    field: str  # dotted path such as "messages.2.role", or "" for the whole line
    reason: str

    def __str__(self) -> str:
        where = f" field {self.field!r}" if self.field else ""
        return f"line {self.line}{where}: {self.reason}"


@dataclass(frozen=True)
class Example:
    line: int
    messages: list[Message]


ISSUES_KEPT = 100  # issues an upload's report keeps (validate_lines(keep_examples=False))
COUNT_CHUNK = 512  # records whose tokens are counted in one call (a fast tokenizer's batch)


@dataclass
class ValidationReport:
    total: int = 0  # non-blank lines
    issues: list[LineIssue] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)  # empty with keep_examples=False
    valid: int = 0  # valid records, kept or not
    max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION
    sha256: str = ""  # of the file's bytes: datasets are recorded by hash in adapter manifests

    @property
    def invalid_lines(self) -> list[int]:
        return sorted({i.line for i in self.issues})

    @property
    def invalid(self) -> int:
        """Invalid records: every non-blank line is valid or has at least one issue."""
        return self.total - self.valid

    @property
    def invalid_fraction(self) -> float:
        return self.invalid / self.total if self.total else 1.0

    @property
    def accepted(self) -> bool:
        return self.valid > 0 and self.invalid_fraction <= self.max_invalid_fraction

    def summary(self, limit: int = 20) -> str:
        head = (
            f"{self.invalid} of {self.total} lines invalid "
            f"({self.invalid_fraction:.1%}; at most {self.max_invalid_fraction:.1%} allowed)"
        )
        if not self.valid and not self.issues:
            head = "no records in file"
        lines = [str(i) for i in self.issues[:limit]]
        if len(self.issues) > limit:
            lines.append(f"... and {len(self.issues) - limit} more")
        return "\n".join([head, *lines])

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "valid": self.valid,
            "invalid": self.invalid,
            "invalid_fraction": self.invalid_fraction,
            "max_invalid_fraction": self.max_invalid_fraction,
            "accepted": self.accepted,
            "sha256": self.sha256,
            "issues": [{"line": i.line, "field": i.field, "reason": i.reason} for i in self.issues],
        }

    def raise_if_rejected(self) -> None:
        if not self.accepted:
            raise DatasetRejected(self)


class DatasetRejected(InvalidRequest):
    """The file has too many invalid lines; the message is the line-level report."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary(), param="training_file", code="invalid_training_file")
        self.report = report


def parse_record(obj: Any) -> list[Message]:
    """One decoded JSON value -> chat messages; raises pydantic's ``ValidationError``."""
    if isinstance(obj, dict) and "messages" in obj:
        return ChatRecord.model_validate(obj).to_messages()
    return InstructionRecord.model_validate(obj).to_messages()


def _issues_from(line: int, exc: ValidationError) -> list[LineIssue]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "literal_error":
            msg = f"bad role {err.get('input')!r}: must be system, user or assistant"
        out.append(LineIssue(line, loc, msg))
    return out


def validate_lines(
    lines: Iterable[str],
    *,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    max_invalid_fraction: float = DEFAULT_MAX_INVALID_FRACTION,
    count_tokens: Callable[[list[list[Message]]], list[int]] | None = None,
    max_seq_length: int | None = None,
    keep_examples: bool = True,
) -> ValidationReport:
    """Validate JSONL text lines. ``count_tokens(records)`` gives the templated lengths in tokens
    of many records' messages (called once per ``COUNT_CHUNK`` records, so a fast tokenizer
    encodes them as one batch); with ``max_seq_length`` set, longer records are invalid (they
    would be truncated in training).
    ``keep_examples=False`` (the gateway's check of an upload) only counts valid records and
    keeps the first ``ISSUES_KEPT`` issues: memory stays at a few dozen bytes per record (the
    duplicate check's 64-bit digests), whatever the file's size.
    """
    report = ValidationReport(max_invalid_fraction=max_invalid_fraction)
    seen: dict[int, int] = {}  # 64-bit digest of the messages' canonical JSON -> first line
    digest = hashlib.sha256()
    count = count_tokens if max_seq_length is not None else None
    uncounted: list[Example] = []  # valid but for their length, in line order

    def accept(examples: list[Example]) -> None:
        lengths = count([e.messages for e in examples]) if count else [None] * len(examples)
        for example, n in zip(examples, lengths, strict=True):
            if n is not None and n > (max_seq_length or 0):
                report.issues.append(LineIssue(
                    example.line, "", f"{n} tokens once templated; max_seq_length is "
                    f"{max_seq_length}"))
                continue
            report.valid += 1
            if keep_examples:
                report.examples.append(example)

    for number, raw in enumerate(lines, start=1):
        if not keep_examples and len(report.issues) > ISSUES_KEPT:
            del report.issues[ISSUES_KEPT:]
        digest.update(raw.encode() + (b"" if raw.endswith("\n") else b"\n"))
        text = raw.strip()
        if not text:
            continue  # blank lines (a trailing newline) are not records
        report.total += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON: {exc.msg} at column {exc.colno}"
            report.issues.append(LineIssue(number, "", reason))
            continue
        if not isinstance(obj, dict):
            report.issues.append(LineIssue(number, "", "a line must be a JSON object"))
            continue
        try:
            messages = parse_record(obj)
        except ValidationError as exc:
            report.issues.extend(_issues_from(number, exc))
            continue
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        long = [i for i in answers if len(messages[i]["content"]) > max_output_chars]
        if long:
            where = "output" if "messages" not in obj else f"messages.{long[0]}.content"
            size = len(messages[long[0]]["content"])
            report.issues.append(
                LineIssue(number, where, f"output is {size} characters; at most {max_output_chars}")
            )
            continue
        key = int.from_bytes(hashlib.blake2b(json.dumps(
            messages, sort_keys=True, ensure_ascii=False).encode(), digest_size=8).digest())
        if key in seen:
            report.issues.append(LineIssue(number, "", f"exact duplicate of line {seen[key]}"))
            continue
        seen[key] = number
        uncounted.append(Example(number, messages))
        if len(uncounted) >= (COUNT_CHUNK if count else 1):
            accept(uncounted)
            uncounted = []
    if uncounted:
        accept(uncounted)
    if count:  # length issues were found a chunk late
        report.issues.sort(key=lambda issue: issue.line)
    if not keep_examples:
        del report.issues[ISSUES_KEPT:]
    report.sha256 = digest.hexdigest()
    return report


def validate_file(path: str | Path, **kwargs: Any) -> ValidationReport:
    """Validate a JSONL file (UTF-8); see :func:`validate_lines` for the options."""
    with Path(path).open(encoding="utf-8", errors="replace", newline="") as f:
        return validate_lines(f, **kwargs)


def load_examples(path: str | Path, **kwargs: Any) -> list[Example]:
    """Validate and return the examples, raising :class:`DatasetRejected` when over the limit."""
    report = validate_file(path, **kwargs)
    report.raise_if_rejected()
    return report.examples


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
