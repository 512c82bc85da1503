"""The README stays short and every relative link in it and in docs/ points at a file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_at_most_8000_bytes() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 8000


def test_relative_links_resolve() -> None:
    broken = []
    for page in [ROOT / "README.md", ROOT / "bench" / "README.md",
                 *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = page.parent / target
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
