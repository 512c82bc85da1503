"""The rule-based evaluator of served answers (sampled traffic, shadow replays).

An adapter version's :class:`Rules` come from its manifest: ``eval.labels`` (the answers it may
give; the trainer writes the golden set's distinct answers there when they are few), else the
labels of a ``label_set:...`` scorer, and ``eval.json_schema`` when a schema is declared. One
answer is scored by the checks that apply to it:

- ``in_label_set``: the answer names one of the labels (``shared.scoring.LabelSet``);
- ``valid_json``: the answer's first JSON object validates against the schema (the subset of
  JSON Schema below: ``type``, ``properties``, ``required``, ``enum``, ``items``,
  ``additionalProperties: false``);
- ``label_match``: the answer equals the feedback label (or corrected output), where there is one
  (the label named first when labels are known, else exact match after normalisation).

The answer's score is 1 when every applicable check passes, else 0; an answer with no applicable
check is not scored. A version's quality is the mean over its scored answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.scoring import LabelSet, _first_json_object, exact_match, normalize

MAX_LABELS = 20  # more distinct golden answers than this: free text, not a label set


@dataclass(frozen=True)
class Rules:
    labels: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | None) -> Rules:
        m = manifest or {}
        ev = m.get("eval") or {}
        labels = tuple(str(x) for x in ev.get("labels") or ())
        scorer = str((m.get("metrics") or {}).get("scorer") or "")
        if not labels and scorer.startswith("label_set:"):
            labels = tuple(x.strip() for x in scorer.partition(":")[2].split(",") if x.strip())
        schema = ev.get("json_schema")
        return cls(labels, schema if isinstance(schema, dict) else None)

    @property
    def empty(self) -> bool:
        return not self.labels and self.json_schema is None


def labels_of(answers: Iterable[str]) -> list[str] | None:
    """The distinct answers of a golden set when they look like labels (few and short)."""
    seen: dict[str, str] = {}
    for a in answers:
        seen.setdefault(normalize(a), a.strip())
        if len(seen) > MAX_LABELS:
            return None
    if not seen or any(len(k) > 40 or not k for k in seen):
        return None
    return sorted(seen.values())


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Violations of ``schema`` (the subset named in the module docstring) by ``value``."""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t is not None:
        allowed = t if isinstance(t, list) else [t]
        ok = False
        for k in allowed:
            if k in ("number", "integer"):
                ok |= isinstance(value, int | float) and not isinstance(value, bool) and (
                    k == "number" or float(value).is_integer())
            elif k in kinds:
                ok |= isinstance(value, kinds[k])
        if not ok:
            return [f"{path}: not {t}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        errors += [f"{path}.{k}: missing" for k in schema.get("required") or () if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{k}: not allowed")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{path}[{i}]")
    return errors


def valid_json(answer: str, schema: dict[str, Any]) -> bool:
    try:
        value = json.loads(answer)
    except ValueError:
        value = _first_json_object(answer)
        if value is None:
            return False
    return not schema_errors(value, schema)


def check(answer: str, rules: Rules, label: str | None = None) -> dict[str, bool]:
    """The applicable checks of one answer, by name (see the module docstring)."""
    out: dict[str, bool] = {}
    found = LabelSet(rules.labels).find(answer) if rules.labels else None
    if rules.labels:
        out["in_label_set"] = found is not None
    if rules.json_schema is not None:
        out["valid_json"] = valid_json(answer, rules.json_schema)
    if label is not None and label.strip():
        if rules.labels:
            out["label_match"] = found is not None and found == normalize(label)
        else:
            out["label_match"] = bool(exact_match(answer, label))
    return out


def score(answer: str, rules: Rules, label: str | None = None) -> float | None:
    checks = check(answer, rules, label)
    return float(all(checks.values())) if checks else None


@dataclass
class Tally:
    """Running totals of scored answers (one version, one window)."""

    n: int = 0  # scored answers
    total: float = 0.0
    requests: int = 0  # rows seen, scored or not
    errors: int = 0  # rows whose status was >= 400
    labelled: int = 0
    label_hits: int = 0
    checks: dict[str, list[int]] = field(default_factory=dict)  # name -> [passed, applied]

    def add(self, answer: str, rules: Rules, label: str | None = None,
            status: int = 200) -> None:
        self.requests += 1
        if status >= 400:
            self.errors += 1
            return
        checks = check(answer, rules, label)
        for k, ok in checks.items():
            c = self.checks.setdefault(k, [0, 0])
            c[0] += int(ok)
            c[1] += 1
        if "label_match" in checks:
            self.labelled += 1
            self.label_hits += int(checks["label_match"])
        if checks:
            self.n += 1
            self.total += float(all(checks.values()))

    @property
    def quality(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def accuracy(self) -> float | None:
        return self.label_hits / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "quality": self.quality, "requests": self.requests,
                "errors": self.errors, "labelled": self.labelled, "accuracy": self.accuracy,
                "checks": {k: v[0] / v[1] for k, v in self.checks.items() if v[1]}}


def answer_text(output: Any) -> str:
    """The answer's text from an OpenAI chat/completions body, or a stored string as is."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        choice = (output.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        return str(msg.get("content") or choice.get("text") or "")
    return ""
