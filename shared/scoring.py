"""Golden-set scorers: how a generated answer is compared with the reference answer.

A scorer is any callable ``(prediction, reference) -> float`` in [0, 1]. Built in:

- ``exact`` (default): equal after :func:`normalize` (case, surrounding whitespace and quotes,
  inner runs of whitespace, trailing punctuation);
- ``label_set:A,B,...``: the first label of the set that the prediction names must be the
  reference's label (for classifiers that answer "Fresh." or "the review is rotten");
- ``json_fields:a,b``: the fraction of the named fields of the reference JSON object that the
  prediction's JSON object (the first ``{...}`` in it) reproduces;
- ``module.path:attribute``: any importable callable (or class, instantiated with no arguments).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Scorer = Callable[[str, str], float]

_SPACE = re.compile(r"\s+")
_EDGE = " \t\n\r\"'`.,;:!?"


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower()).strip(_EDGE)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


@dataclass(frozen=True)
class LabelSet:
    labels: tuple[str, ...]

    def find(self, text: str) -> str | None:
        norm = normalize(text)
        best: tuple[int, str] | None = None
        for label in self.labels:
            m = re.search(rf"\b{re.escape(normalize(label))}\b", norm)
            if m and (best is None or m.start() < best[0]):
                best = (m.start(), normalize(label))
        return best[1] if best else None

    def __call__(self, prediction: str, reference: str) -> float:
        found = self.find(prediction)
        return float(found is not None and found == normalize(reference))


def _first_json_object(text: str) -> Any:
    start = text.find("{")
    while start != -1:
        depth = 0
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        return json.loads(text[start : i + 1])
                    except json.JSONDecodeError:
                        break
        start = text.find("{", start + 1)
    return None


@dataclass(frozen=True)
class JsonFields:
    fields: tuple[str, ...]

    def __call__(self, prediction: str, reference: str) -> float:
        ref = _first_json_object(reference)
        pred = _first_json_object(prediction)
        if not isinstance(ref, dict) or not isinstance(pred, dict):
            return 0.0
        names = self.fields or tuple(ref)
        if not names:
            return float(pred == ref)
        return sum(1.0 for f in names if f in pred and pred[f] == ref.get(f)) / len(names)


def get_scorer(spec: str | None = None) -> Scorer:
    """A scorer from its spec string (see the module docstring); ``None`` means ``exact``."""
    if not spec or spec == "exact":
        return exact_match
    kind, _, arg = spec.partition(":")
    items = tuple(a.strip() for a in arg.split(",") if a.strip())
    if kind == "label_set":
        if not items:
            raise ValueError("label_set needs labels: label_set:A,B")
        return LabelSet(items)
    if kind == "json_fields":
        return JsonFields(items)
    if arg and "." in kind:
        obj = getattr(importlib.import_module(kind), arg)
        scorer = obj() if isinstance(obj, type) else obj
        if not callable(scorer):
            raise ValueError(f"{spec} is not callable")
        return scorer  # type: ignore[no-any-return]
    raise ValueError(f"unknown scorer {spec!r}: exact, label_set:..., json_fields:..., module:attr")


@dataclass(frozen=True)
class ScoreReport:
    score: float  # mean per-item score in [0, 1]
    n: int
    per_item: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "n": self.n}


def score_all(predictions: Sequence[str], references: Sequence[str], scorer: Scorer) -> ScoreReport:
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    pairs = zip(predictions, references, strict=True)
    items = tuple(max(0.0, min(1.0, float(scorer(p, r)))) for p, r in pairs)
    return ScoreReport(sum(items) / len(items) if items else 0.0, len(items), items)
