"""What the two GPU backends share: padded, length-grouped micro-batches and the loop around a
4-bit model.

Micro-batches are right-padded rows of examples of similar length (``loop.length_grouped_batches``
groups them, so little padding is wasted), with an ``attention_mask`` that hides the padding and
labels only on the answer tokens. Every example is its own row: no example ever attends to another
(plain SDPA, without flash-attention's varlen kernels, cannot keep packed examples apart, and a
4,096-token packed row costs 8x the attention FLOPs of eight 512-token rows).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.chat import Tokenized
from shared.data import Message
from shared.job_spec import TrainSpec
from trainer.backends.base import Hooks, TrainResult, adapter_manifest, save_adapter_atomically
from trainer.backends.loop import ForwardSum, pad_batch, run_loop


def padded_forward_sum(pad_id: int) -> ForwardSum:
    """``forward_sum`` for right-padded micro-batches: the summed loss over the answer tokens.
    The model's own loss (Unsloth's fused cross-entropy) is a mean over the supervised positions,
    so it is scaled back to a sum; the loop divides by the whole step's count."""

    def forward_sum(model: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
        batch = pad_batch(items, pad_id, next(model.parameters()).device)
        # The model shifts labels by one (position t predicts token t+1); a row's first token is
        # never an answer token, so the host's count is the model's, without a device sync.
        n = sum(t.n_supervised for t in items)
        out = model(**batch)
        return out.loss * n, n

    return forward_sum


def train_4bit(
    backend: str, model: Any, tokenizer: Any, spec: TrainSpec,
    examples: list[list[Message]], out_dir: Path, hooks: Hooks, t0: float,
) -> TrainResult:
    """The loop for a prepared 4-bit peft model: 8-bit AdamW, linear warm-up, OOM recovery."""
    import bitsandbytes as bnb
    import torch

    from trainer.backends.cpu import encode_all

    torch.manual_seed(spec.seed)
    torch.cuda.manual_seed_all(spec.seed)
    encoded = encode_all(tokenizer, examples, spec.max_seq_length)
    hooks.on_event(
        f"{backend}: {len(encoded)} examples on {torch.cuda.get_device_name(0)}",
        {"examples": len(encoded),
         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
    )
    optimizer = bnb.optim.AdamW8bit(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.learning_rate, weight_decay=spec.weight_decay,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.cuda.reset_peak_memory_stats()
    result = run_loop(
        model=model, optimizer=optimizer, encoded=encoded, batch_size=spec.batch_size,
        micro_batch_size=spec.micro_batch_size, n_epochs=spec.n_epochs, max_steps=spec.max_steps,
        warmup_ratio=spec.warmup_ratio, seed=spec.seed, forward_sum=padded_forward_sum(pad_id),
        hooks=hooks, on_oom=torch.cuda.empty_cache,
    )
    hooks.check_cancelled()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    manifest = adapter_manifest(spec, backend=backend, steps=result.steps,
                                extra={"peak_gib": round(peak_gib, 2)})
    save_adapter_atomically(model, out_dir, manifest)
    return TrainResult(
        backend=backend, steps=result.steps, train_s=time.monotonic() - t0, tokens=result.tokens,
        final_loss=result.losses[-1] if result.losses else float("nan"),
        micro_batch_size=result.micro_batch_size, grad_accum=result.grad_accum,
        adapter_dir=out_dir, losses=result.losses,
    )
