"""Sampled traffic as data: labelled samples become training and golden (evaluation) records.

A sample becomes one record in the shapes ``shared.data`` accepts for uploaded files: a chat
request (``/v1/chat/completions``, also ``/v1/generate``) becomes ``{"messages": [...the client's
messages..., {"role": "assistant", "content": TARGET}]}``; a completion request becomes
``{"instruction": PROMPT, "output": TARGET}``. The target is the feedback's
``corrected_output``, else its ``label``, and only feedback given by a key that may label
(``feedback_trusted``: admin keys, or keys created with ``may_label``) counts; unlabelled
samples are only exported on request, with the answer that was served as the target (for
replays, never for training).

Which samples: those of one adapter name (``NAME``, every version and lane) or one version
(``NAME@vN``), or ``base``, created in ``[since, until)``, answered with status 200; shadow rows
are left out (their prompt is the live row's). Records that repeat a prompt keep the latest
feedback; records that ``shared.data.validate_lines`` would refuse (messages that are not plain
text, an assistant turn last, an answer over 512 characters, ...) are left out and counted.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, select

from shared.data import parse_record, validate_lines
from shared.db import Database
from shared.errors import InvalidRequest
from shared.traffic_records import TrafficSample

CHAT_ROUTES = ("/v1/chat/completions", "/v1/generate")
_MODEL_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})(?:@v?(?P<version>\d{1,9}))?$")


@dataclass
class TrafficData:
    records: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0  # samples that matched the query
    skipped: int = 0  # matched, but not expressible as a valid record
    duplicates: int = 0  # matched, but the same prompt as a later sample

    def lines(self) -> list[str]:
        return [json.dumps(r, ensure_ascii=False) for r in self.records]

    def summary(self) -> dict[str, int]:
        return {"records": len(self.records), "samples": self.samples, "skipped": self.skipped,
                "duplicates": self.duplicates}


def parse_model(model: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@vN`` (``base`` too) -> ``(name, version or None)``."""
    m = _MODEL_RE.match(model)
    if m is None:
        raise InvalidRequest(f"invalid model {model!r}: expected NAME or NAME@vN", param="model")
    version = m.group("version")
    return m.group("name"), int(version) if version is not None else None


def target_of(row: TrafficSample, *, labelled: bool = True) -> str | None:
    if row.corrected_output:
        return row.corrected_output
    if row.label:
        return row.label
    return None if labelled else (row.output or None)


def sample_record(row: TrafficSample, target: str) -> dict[str, Any] | None:
    """The training record of one sample, or None when its request cannot be one."""
    req = row.request if isinstance(row.request, dict) else {}
    rec: dict[str, Any]
    if row.route in CHAT_ROUTES:
        messages = req.get("messages")
        if not isinstance(messages, list):
            return None
        turns = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None  # content parts (images, ...) are not training data here
            turns.append({"role": m.get("role"), "content": m["content"]})
        rec = {"messages": [*turns, {"role": "assistant", "content": target}]}
    elif row.route == "/v1/completions":
        prompt = req.get("prompt")
        if not isinstance(prompt, str):
            return None
        rec = {"instruction": prompt, "output": target}
    else:
        return None
    try:
        parse_record(rec)
    except ValueError:  # pydantic's ValidationError is a ValueError
        return None
    return rec


def query_samples(db: Database, model: str, since: dt.datetime,
                  until: dt.datetime | None = None, *, labelled: bool = True,
                  ) -> list[TrafficSample]:
    name, version = parse_model(model)
    q = select(TrafficSample).where(TrafficSample.name == name, TrafficSample.status == 200,
                                    TrafficSample.lane != "shadow",
                                    TrafficSample.created_at >= _utc(since))
    if version is not None:
        q = q.where(TrafficSample.version == version)
    if until is not None:
        q = q.where(TrafficSample.created_at < _utc(until))
    if labelled:  # only labels from keys that may label (see shared.traffic_records)
        q = q.where(TrafficSample.feedback_trusted.is_(True),
                    or_(TrafficSample.label.is_not(None),
                        TrafficSample.corrected_output.is_not(None)))
    with db.session() as s:
        return list(s.scalars(q.order_by(TrafficSample.created_at, TrafficSample.id)))


def traffic_data(db: Database, model: str, since: dt.datetime, until: dt.datetime | None = None,
                 *, labelled: bool = True, exclude: Iterable[str] = ()) -> TrafficData:
    """Records from the samples (see the module's docstring). ``exclude``: canonical message keys
    (:func:`record_key`) already present elsewhere, e.g. in the base training file."""
    out = TrafficData()
    rows = query_samples(db, model, since, until, labelled=labelled)
    out.samples = len(rows)
    by_prompt: dict[str, dict[str, Any]] = {}
    seen = set(exclude)
    for row in rows:
        target = target_of(row, labelled=labelled)
        rec = sample_record(row, target) if target else None
        if rec is None:
            out.skipped += 1
            continue
        key = prompt_key(rec)
        if key in by_prompt:
            out.duplicates += 1
        by_prompt[key] = rec  # rows come oldest first: the latest feedback wins
    candidates = [r for r in by_prompt.values() if record_key(r) not in seen]
    out.duplicates += len(by_prompt) - len(candidates)
    lines = [json.dumps(r, ensure_ascii=False) for r in candidates]
    report = validate_lines(lines)
    bad = set(report.invalid_lines)
    out.skipped += len(bad)
    out.records = [r for i, r in enumerate(candidates, start=1) if i not in bad]
    return out


def record_key(rec: dict[str, Any]) -> str:
    """Canonical JSON of a record's messages: equal keys are duplicates for ``shared.data``."""
    return json.dumps(parse_record(rec), sort_keys=True, ensure_ascii=False)


def prompt_key(rec: dict[str, Any]) -> str:
    """Canonical JSON of a record's messages without the final answer."""
    return json.dumps(parse_record(rec)[:-1], sort_keys=True, ensure_ascii=False)


def file_keys(lines: Iterable[str]) -> set[str]:
    """:func:`record_key` of every valid record of a JSONL file's lines."""
    keys = set()
    for line in lines:
        try:
            keys.add(record_key(json.loads(line)))
        except (ValueError, TypeError, AttributeError):
            continue
    return keys


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)
