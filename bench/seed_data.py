"""The seed's training data shape for the GPU benchmarks (``train.py``, ``pipeline_device.py``):
chats of a long user turn of random words and an answer of about an eighth of the tokens, each
of a length drawn uniformly from a range once templated (the seed workload: 300 to 500).
Random words measure speed, never quality."""

from __future__ import annotations

import random
from typing import Any

WORDS = ["river", "stone", "lantern", "orbit", "quiet", "maple", "copper", "harbor", "velvet",
         "signal", "meadow", "thunder", "canvas", "ember", "falcon", "glacier", "willow", "prism"]
TOKENS_PER_WORD = 1.06  # of the words above with the SmolLM2 tokenizer (measured)


def chats(
    tokenizer: Any, n: int, lengths: tuple[int, int], seed: int
) -> list[list[dict[str, str]]]:
    """``n`` chats of ``lengths[0]`` to ``lengths[1]`` tokens (uniform) with ``tokenizer``'s
    chat template."""
    overhead = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        tokenize=True, return_dict=False))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens = rng.randint(*lengths)
        answer = max(8, tokens // 8)
        user = max(8, int((tokens - overhead) / TOKENS_PER_WORD) - answer)
        out.append([
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(answer))},
        ])
    return out
