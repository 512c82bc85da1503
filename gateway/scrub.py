"""Scrubbing of sampled traffic: personal data is masked before a record leaves the gateway.

The default hook replaces, in every string of the request body and in the answer:

- e-mail addresses with ``[email]``;
- card numbers (13 to 19 digits, optionally grouped by spaces or dashes, passing the Luhn check,
  so that most order numbers and ids stay) with ``[card]``;
- phone numbers with ``[phone]``: an optional ``+CC`` country code, then an area part of 2 to 4
  digits (optionally in parentheses) and two groups of 3 or 4 digits, separated by spaces, dots
  or dashes (``+1 415 555 2671``, ``(415) 555-2671``, ``+44 20 7946 0958``). Dates such as
  ``2024-01-05`` and bare digit runs do not match.

It is a best effort, not a guarantee: text that names a person, or numbers in other layouts,
pass through. Operators with stricter needs set ``TUNEGATE_GATEWAY_SAMPLE_SCRUBBER`` to a dotted
path of their own ``str -> str`` function (``pkg.module.func`` or ``pkg.module:func``), or to
``off``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

Scrubber = Callable[[str], str]

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
    r"\d{3,4}[ .-]?\d{3,4}(?!\w)(?![ .-]\d)")
# Cheap pre-checks: most prompts contain neither an "@" nor a run of digits, and skip the regexes.
_DIGITS = re.compile(r"\d{2}")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", m.group(0))
    return "[card]" if _luhn(digits) else m.group(0)


def scrub_text(text: str) -> str:
    """The default hook: e-mail addresses, card numbers and phone numbers masked."""
    if "@" in text:
        text = _EMAIL.sub("[email]", text)
    if _DIGITS.search(text):
        text = _CARD.sub(_card, text)
        text = _PHONE.sub("[phone]", text)
    return text


MAX_DEPTH = 32  # nesting levels scrubbed; anything deeper is replaced by DEPTH_MARK
DEPTH_MARK = "[too deep]"


def scrub_value(value: Any, hook: Scrubber, depth: int = 0) -> Any:
    """Every string inside a JSON value passed through ``hook`` (keys are left alone). Containers
    nested deeper than ``MAX_DEPTH`` are replaced by ``DEPTH_MARK``: the recursion is bounded and
    nothing unscrubbed is kept (no chat or completion body needs that depth)."""
    if isinstance(value, str):
        return hook(value)
    if isinstance(value, (list, dict)) and depth >= MAX_DEPTH:
        return DEPTH_MARK
    if isinstance(value, list):
        return [scrub_value(v, hook, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: scrub_value(v, hook, depth + 1) for k, v in value.items()}
    return value


def load_scrubber(spec: str) -> Scrubber | None:
    """``default`` -> :func:`scrub_text`; ``off`` (or empty) -> None; else a dotted path to a
    callable. Fails at startup (ValueError) rather than sampling unscrubbed text."""
    spec = spec.strip()
    if spec == "default":
        return scrub_text
    if spec in ("", "off", "none"):
        return None
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise ValueError(f"sample scrubber {spec!r}: expected 'default', 'off' or pkg.module.func")
    try:
        hook = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"sample scrubber {spec!r} cannot be loaded: {exc}") from exc
    if not callable(hook):
        raise ValueError(f"sample scrubber {spec!r} is not callable")
    return hook  # type: ignore[no-any-return]
