"""The model runner on the real SmolLM2, in process: batched prefill (left padding) and batched
decode over the slot cache give what each sequence gets alone, also after a slot move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.embedded.runner import ModelRunner


@pytest.fixture(scope="module")
def runner(default_model_dir: Path) -> ModelRunner:
    return ModelRunner(default_model_dir, max_num_seqs=4, max_model_len=256)


def greedy_alone(runner: ModelRunner, ids: list[int], steps: int) -> tuple[list[int], Any]:
    logits = runner.prefill([(0, ids, None)])
    out = [int(logits.argmax(-1)[0])]
    all_logits = [logits[0]]
    for _ in range(steps):
        logits = runner.decode([out[-1]], [len(ids) + len(out) - 1], [None])
        out.append(int(logits.argmax(-1)[0]))
        all_logits.append(logits[0])
    return out, torch.stack(all_logits)


def test_batched_equals_alone_with_padding_and_slot_moves(runner: ModelRunner) -> None:
    tok = runner.tokenizer
    prompts = [tok.encode("The capital of France is"),
               tok.encode("Once upon a time, in a land far away, there lived a"),
               tok.encode("1, 2, 3,")]
    steps = 6
    alone = [greedy_alone(runner, p, steps) for p in prompts]

    # All three prefilled together (different lengths: left padding), decoded together.
    logits = runner.prefill([(i, p, None) for i, p in enumerate(prompts)])
    outs = [[int(t)] for t in logits.argmax(-1)]
    firsts = [logits[i] for i in range(3)]
    for step in range(steps):
        if step == 3:
            # The first sequence leaves: the last slot moves into slot 0, as the scheduler does.
            runner.move_slot(2, 0, len(prompts[2]) + len(outs[2]) - 1)
            prompts, outs, alone = [prompts[2], prompts[1]], [outs[2], outs[1]], \
                [alone[2], alone[1]]
            firsts = []
        logits = runner.decode([o[-1] for o in outs],
                               [len(p) + len(o) - 1 for p, o in zip(prompts, outs, strict=True)],
                               [None] * len(outs))
        for i, o in enumerate(outs):
            o.append(int(logits[i].argmax()))
    for out, (ref, _) in zip(outs, alone, strict=True):
        assert out == ref
    for i, first in enumerate(firsts):
        assert torch.allclose(first, alone[i][1][0], atol=1e-3)


def test_bfloat16_runner_tracks_float32(runner: ModelRunner, default_model_dir: Path) -> None:
    """bfloat16 moves log-probabilities by rounding noise only (top-5 at most 0.09 nats on an
    AVX-512-bf16 CPU; transformers' own bfloat16 forward: 0.14), so it answers what float32
    answers where float32 is sure. Where float32 nearly ties (its first token for the chat
    question below: "The" -1.88 vs "L" -1.97), bfloat16 may take either, and the test does not
    ask it to pick."""
    bf16 = ModelRunner(default_model_dir, max_num_seqs=2, max_model_len=128, dtype="bfloat16")
    tok = bf16.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    for ids in (tok.encode(chat, add_special_tokens=False), tok.encode("The capital of France is")):
        ref = runner.prefill([(0, ids, None)])[0].float().log_softmax(-1)
        got = bf16.prefill([(0, ids, None)])[0].float().log_softmax(-1)
        top = ref.topk(5).indices
        assert (got[top] - ref[top]).abs().max() < 0.3, (got[top], ref[top])
    out, _ = greedy_alone(bf16, tok.encode("The capital of France is"), 3)
    assert "Paris" in tok.decode(out)
