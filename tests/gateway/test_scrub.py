"""The default scrubbing hook and how a hook is chosen."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.scrub import load_scrubber, scrub_text, scrub_value
from gateway.traffic_sampler import parse_traceparent, stream_text


@pytest.mark.parametrize(("text", "expected"), [
    ("write to john.doe+x@mail.example.co.uk today", "write to [email] today"),
    ("card 4111 1111 1111 1111, exp 12/29", "card [card], exp 12/29"),
    ("card 4111-1111-1111-1111", "card [card]"),
    ("ref 4111111111111111", "ref [card]"),
    ("call +1 415 555 2671.", "call [phone]."),
    ("(415) 555-2671 or 555-123-4567", "[phone] or [phone]"),
    ("+44 20 7946 0958", "[phone]"),
])
def test_masks_personal_data(text: str, expected: str) -> None:
    assert scrub_text(text) == expected


@pytest.mark.parametrize("text", [
    "on 2024-01-05 at 10:30", "order 123456789012345", "4111-1111-1111-1112 fails Luhn",
    "ip 192.168.100.200", "scores 0.95, 12 items, 1 2 3 4 5 6 7 8 9 10 11 12 13",
    "a great movie, fresh",
])
def test_leaves_ordinary_text(text: str) -> None:
    assert scrub_text(text) == text


def test_scrub_value_walks_json() -> None:
    body: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "mail a@b.io"},
        {"role": "user", "content": [{"type": "text", "text": "x@y.org"}]}]}
    out: Any = scrub_value(body, scrub_text)
    assert out["messages"][0]["content"] == "mail [email]"
    assert out["messages"][1]["content"][0]["text"] == "[email]"
    assert out["max_tokens"] == 5 and body["messages"][0]["content"] == "mail a@b.io"


def test_load_scrubber() -> None:
    assert load_scrubber("default") is scrub_text
    assert load_scrubber("off") is None
    assert load_scrubber("gateway.scrub.scrub_text") is scrub_text
    assert load_scrubber("gateway.scrub:scrub_text") is scrub_text
    for bad in ("gateway.scrub.nothing", "nowhere.module:f", "gateway.scrub:_EMAIL", "x"):
        with pytest.raises(ValueError):
            load_scrubber(bad)


def test_traceparent() -> None:
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse_traceparent(f"00-{tid}-00f067aa0ba902b7-01") == tid
    assert parse_traceparent(f"00-{tid.upper()}-00f067aa0ba902b7-01") == tid
    assert parse_traceparent("00-" + "0" * 32 + "-00f067aa0ba902b7-01") is None
    assert parse_traceparent("garbage") is None and parse_traceparent(None) is None


def test_stream_text_reassembles_chat_and_completions() -> None:
    chat = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n',
            b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n', b"data: [DONE]\n\n"]
    assert stream_text(chat) == "Hello"
    comp = [b'data: {"choices":[{"index":0,"text":"a"}]}\n\n',
            b'data: {"choices":[{"index":1,"text":"zzz"}]}\n\n',
            b'data: {"choices":[{"index":0,"text":"b","finish_reason":"stop"}]}\n\n']
    assert stream_text(comp) == "ab"
