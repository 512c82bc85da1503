from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.chat import (
    IGNORE_INDEX,
    count_tokens,
    count_tokens_many,
    prompt_text,
    render,
    tokenize_for_training,
    tokenize_many,
)


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def supervised_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return str(tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]))


def test_labels_only_on_the_answer(tok: Any) -> None:
    messages = [{"role": "user", "content": "Classify: a great film"},
                {"role": "assistant", "content": "fresh"}]
    t = tokenize_for_training(tok, messages)
    assert tok.decode(t.input_ids) == render(tok, messages)
    assert supervised_text(tok, t.input_ids, t.labels).strip() == "fresh<|im_end|>"
    # Exactly the answer's characters: up to the span's last one (the template's newline).
    answer = render(tok, messages)[len(prompt_text(tok, messages)):]
    assert supervised_text(tok, t.input_ids, t.labels) == answer == "fresh<|im_end|>\n"
    # Everything before the answer (system, user turn, assistant header) is masked.
    n_prompt = len(tok(prompt_text(tok, messages), add_special_tokens=False)["input_ids"])
    assert all(lab == IGNORE_INDEX for lab in t.labels[:n_prompt])
    assert t.labels[n_prompt] == t.input_ids[n_prompt]


def test_every_assistant_turn_is_supervised(tok: Any) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    t = tokenize_for_training(tok, messages)
    text = supervised_text(tok, t.input_ids, t.labels)
    assert text.replace("\n", "") == "4<|im_end|>6<|im_end|>"
    assert "Be terse" not in text and "3+3" not in text
    assert count_tokens(tok, messages) == len(t.input_ids)


def test_truncation_keeps_ids_and_labels_aligned(tok: Any) -> None:
    messages = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    t = tokenize_for_training(tok, messages, max_seq_length=16)
    assert len(t.input_ids) == len(t.labels) == 16
    assert t.n_supervised == 0


def test_many_conversations_encode_as_each_alone(tok: Any) -> None:
    chats = [[{"role": "user", "content": f"Classify: film {i} " * (1 + i)},
              {"role": "assistant", "content": "fresh" if i % 2 else "rotten"}] for i in range(5)]
    assert tokenize_many(tok, chats, max_seq_length=24) == [
        tokenize_for_training(tok, c, max_seq_length=24) for c in chats]
    assert tokenize_many(tok, []) == []


def test_direct_rust_encoding_labels_as_the_wrapper_does(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels read from the Rust encodings near the answers equal those from every token's
    offsets through the transformers wrapper, on text whose characters span several tokens or
    share one (emoji, CJK, combining marks, odd whitespace) and on several turns."""
    import shared.chat as chat

    contents = ["fresh 🍅🍅 ok", "良い映画です。", "e\u0301te\u0301  \t\n end", "  ", "🇫🇷\u200d!",
                "word " * 30]
    chats = [[{"role": "system", "content": c}, {"role": "user", "content": f"say {c}"},
              {"role": "assistant", "content": c}, {"role": "user", "content": "again"},
              {"role": "assistant", "content": f"{c}{c}"}] for c in contents]
    assert chat._plain_backend(tok) is not None
    direct = [tokenize_many(tok, chats, max_seq_length=n) for n in (None, 40)]
    monkeypatch.setattr(chat, "_plain_backend", lambda _tok: None)
    wrapped = [tokenize_many(tok, chats, max_seq_length=n) for n in (None, 40)]
    assert direct == wrapped
    assert all(t.n_supervised > 0 for t in direct[0])


def test_a_tokenizer_set_to_truncate_goes_through_the_wrapper(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    import shared.chat as chat

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    tok.backend_tokenizer.enable_truncation(8)
    assert chat._plain_backend(tok) is None


def test_lengths_counted_in_one_batch_equal_the_wrapper_one_by_one(tok: Any) -> None:
    chats = [[{"role": "user", "content": c}, {"role": "assistant", "content": c[::-1]}]
             for c in ("a great film", "🍅 rotten 🍅", "良い映画", "x " * 200)]
    one_by_one = [len(tok(render(tok, c), add_special_tokens=False)["input_ids"]) for c in chats]
    assert count_tokens_many(tok, chats) == one_by_one
    assert [count_tokens(tok, c) for c in chats] == one_by_one
    assert count_tokens_many(tok, []) == []
