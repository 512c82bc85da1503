"""The fast path (embedded fast_llama) against the reference (transformers + peft), in process:
same greedy tokens and close logits over batched prefill and decode, with and without adapters,
in mixed batches; base rows of a mixed batch exactly base; fallbacks to the reference path for
models and adapters the fast path cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.embedded.runner import ModelRunner
from engine.models import SHAPES, write_random_model
from tests.protocol_checks import make_adapter

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Once upon a time, in a land far away, there lived a",
           "1, 2, 3,", "def fibonacci(n):")
STEPS = 8


def greedy(runner: ModelRunner, prompts: list[list[int]], adapters: list[str | None],
           steps: int = STEPS) -> tuple[list[list[int]], Any]:
    """All prompts prefilled together (left padding) and decoded together; returns each row's
    tokens and the logits of every step ``[steps + 1, rows, vocab]``."""
    logits = runner.prefill([(i, p, a) for i, (p, a) in enumerate(zip(prompts, adapters,
                                                                       strict=True))])
    outs = [[int(t)] for t in logits.argmax(-1)]
    seen = [logits.float()]
    for _ in range(steps):
        logits = runner.decode([o[-1] for o in outs],
                               [len(p) + len(o) - 1 for p, o in zip(prompts, outs, strict=True)],
                               adapters)
        for i, o in enumerate(outs):
            o.append(int(logits[i].argmax()))
        seen.append(logits.float())
    return outs, torch.stack(seen)


@pytest.fixture(scope="module")
def lora_dirs(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("fast-adapters")
    return [
        make_adapter(default_model_dir, root / "qv", rank=8, seed=1, targets=["q_proj", "v_proj"]),
        make_adapter(default_model_dir, root / "attn", rank=4, seed=2,
                     targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        make_adapter(default_model_dir, root / "mlp", rank=8, seed=3,
                     targets=["gate_proj", "up_proj", "down_proj"]),
    ]


@pytest.fixture(scope="module")
def pair(default_model_dir: Path, lora_dirs: list[Path]) -> dict[str, Any]:
    """A reference and a fast runner with the same three adapters loaded."""
    out: dict[str, Any] = {}
    for impl in ("hf", "fast"):
        runner = ModelRunner(default_model_dir, max_num_seqs=4, max_model_len=256, impl=impl)
        out[impl] = runner
        out[impl + "_keys"] = [runner.load_adapter(p) for p in lora_dirs]
    assert out["fast"].impl == "fast" and out["hf"].impl == "hf"
    out["prompts"] = [out["hf"].tokenizer.encode(p) for p in PROMPTS]
    return out


def test_base_matches_reference(pair: dict[str, Any]) -> None:
    ref_tokens, ref_logits = greedy(pair["hf"], pair["prompts"], [None] * 4)
    tokens, logits = greedy(pair["fast"], pair["prompts"], [None] * 4)
    assert tokens == ref_tokens
    assert torch.allclose(logits, ref_logits, atol=1e-3)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_each_adapter_matches_reference(pair: dict[str, Any], which: int) -> None:
    ref_tokens, ref_logits = greedy(pair["hf"], pair["prompts"], [pair["hf_keys"][which]] * 4)
    tokens, logits = greedy(pair["fast"], pair["prompts"], [pair["fast_keys"][which]] * 4)
    base_tokens, _ = greedy(pair["fast"], pair["prompts"], [None] * 4)
    assert tokens == ref_tokens
    assert tokens != base_tokens, "adapter too weak to tell apart from base"
    assert torch.allclose(logits, ref_logits, atol=1e-3)


def test_mixed_batch_matches_reference_and_base_rows_are_exact(pair: dict[str, Any]) -> None:
    hk, fk = pair["hf_keys"], pair["fast_keys"]
    ref_tokens, ref_logits = greedy(pair["hf"], pair["prompts"], [None, hk[0], hk[1], hk[2]])
    tokens, logits = greedy(pair["fast"], pair["prompts"], [None, fk[0], fk[1], fk[2]])
    assert tokens == ref_tokens
    assert torch.allclose(logits, ref_logits, atol=1e-3)
    # The base row gets no delta at all: bit for bit what the same batch gives with no adapters.
    _, base_logits = greedy(pair["fast"], pair["prompts"], [None] * 4)
    assert torch.equal(logits[:, 0], base_logits[:, 0])
    # ... and a row alone gets what it gets in the mixed batch.
    alone, _ = greedy(pair["fast"], pair["prompts"][2:3], [fk[1]])
    assert alone[0] == tokens[2]


def test_unloading_an_adapter_restacks(pair: dict[str, Any], default_model_dir: Path,
                                       lora_dirs: list[Path]) -> None:
    runner = ModelRunner(default_model_dir, max_num_seqs=2, max_model_len=128)
    first = runner.load_adapter(lora_dirs[0])
    second = runner.load_adapter(lora_dirs[2])
    prompts = pair["prompts"][:2]
    before, _ = greedy(runner, prompts, [second, None])
    runner.unload_adapter(first)
    after, _ = greedy(runner, prompts, [second, None])
    assert after == before
    runner.unload_adapter(second)
    base, _ = greedy(runner, prompts, [None, None])
    ref, _ = greedy(pair["hf"], prompts, [None, None])
    assert base == ref and runner.impl == "fast"


def test_an_adapter_the_fast_path_cannot_apply_falls_back(pair: dict[str, Any],
                                                          default_model_dir: Path,
                                                          tmp_path: Path) -> None:
    odd = make_adapter(default_model_dir, tmp_path / "head", rank=4, seed=5,
                       targets=["q_proj", "lm_head"])
    runner = pair["fast"]
    key = runner.load_adapter(odd)
    try:
        assert runner.impl == "hf"
        tokens, _ = greedy(runner, pair["prompts"][:2], [key, pair["fast_keys"][0]], steps=3)
        ref_key = pair["hf"].load_adapter(odd)
        try:
            ref, _ = greedy(pair["hf"], pair["prompts"][:2], [ref_key, pair["hf_keys"][0]],
                            steps=3)
        finally:
            pair["hf"].unload_adapter(ref_key)
        assert tokens == ref
    finally:
        runner.unload_adapter(key)
    assert runner.impl == "fast"


def _tiny(default_model_dir: Path, target: Path, **changes: Any) -> Path:
    write_random_model("llama-tiny", target, tokenizer_from=default_model_dir)
    if changes:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPES["llama-tiny"], **changes},
                                             tie_word_embeddings=False, bos_token_id=1,
                                             eos_token_id=2))
        model.save_pretrained(target)
    return target


@pytest.mark.parametrize("changes", [
    {},
    # The real Llama-3.1 RoPE (frequency scaling) and a different head layout.
    {"rope_theta": 500000.0, "rope_scaling": SHAPES["llama-3.1-8b"]["rope_scaling"],
     "num_attention_heads": 8, "num_key_value_heads": 2},
])
def test_other_llama_shapes_run_fast_and_match(default_model_dir: Path, tmp_path: Path,
                                               changes: dict[str, Any]) -> None:
    model = _tiny(default_model_dir, tmp_path / "tiny", **changes)
    ref = ModelRunner(model, max_num_seqs=4, max_model_len=128, impl="hf")
    fast = ModelRunner(model, max_num_seqs=4, max_model_len=128)
    assert fast.impl == "fast"
    prompts = [ref.tokenizer.encode(p) for p in PROMPTS]
    ref_tokens, ref_logits = greedy(ref, prompts, [None] * 4)
    tokens, logits = greedy(fast, prompts, [None] * 4)
    assert tokens == ref_tokens
    assert torch.allclose(logits, ref_logits, atol=1e-4)


def test_a_model_the_fast_path_cannot_run_falls_back(default_model_dir: Path,
                                                      tmp_path: Path) -> None:
    model = _tiny(default_model_dir, tmp_path / "biased", attention_bias=True)
    runner = ModelRunner(model, max_num_seqs=2, max_model_len=64)
    assert runner.fast is None and runner.impl == "hf"
    tokens, _ = greedy(runner, [runner.tokenizer.encode(PROMPTS[0])], [None], steps=2)
    assert len(tokens[0]) == 3


def test_bfloat16_fast_path_agrees_with_float32(pair: dict[str, Any],
                                                default_model_dir: Path) -> None:
    runner = ModelRunner(default_model_dir, max_num_seqs=4, max_model_len=256, dtype="bfloat16")
    assert runner.impl == "fast"
    ref_tokens, _ = greedy(pair["hf"], pair["prompts"], [None] * 4, steps=4)
    tokens, _ = greedy(runner, pair["prompts"], [None] * 4, steps=4)
    # bfloat16 may flip a near tie late in a sequence; the first tokens must agree.
    assert [t[:2] for t in tokens] == [t[:2] for t in ref_tokens]


def test_bfloat16_with_adapters_tracks_float32(pair: dict[str, Any], default_model_dir: Path,
                                               lora_dirs: list[Path]) -> None:
    """bfloat16 weights with LoRA (the deltas run in float32) in a mixed batch: the same first
    tokens as the float32 reference, top-5 logprobs of the prefill within the bound of
    tests/engine/test_runner.py (0.3 nats), and the base row exactly the base batch's."""
    runner = ModelRunner(default_model_dir, max_num_seqs=4, max_model_len=256, dtype="bfloat16")
    keys = [runner.load_adapter(p) for p in lora_dirs]
    hk = pair["hf_keys"]
    ref_tokens, ref_logits = greedy(pair["hf"], pair["prompts"], [None, hk[0], hk[1], hk[2]],
                                    steps=4)
    tokens, logits = greedy(runner, pair["prompts"], [None, *keys], steps=4)
    assert runner.impl == "fast"
    assert [t[:2] for t in tokens] == [t[:2] for t in ref_tokens]
    ref, got = ref_logits[0].log_softmax(-1), logits[0].log_softmax(-1)
    top = ref.topk(5).indices
    assert (got.gather(1, top) - ref.gather(1, top)).abs().max() < 0.3
    _, base_logits = greedy(runner, pair["prompts"], [None] * 4, steps=4)
    assert torch.equal(logits[:, 0], base_logits[:, 0])
