"""What the two GPU backends share: packed micro-batches and the loop around a 4-bit model.

Packing: a micro-batch's examples are concatenated into one row (no padding at all), with
``position_ids`` restarting at 0 for each example. Attention kernels that read sequence starts
from ``position_ids`` (flash-attention varlen, which transformers and Unsloth use when available)
keep examples apart; with plain SDPA an example can attend to the previous ones in its row, a
known cost of simple packing. Loss never crosses examples: every example starts with prompt
tokens, which are unlabelled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.chat import IGNORE_INDEX, Tokenized
from shared.data import Message
from trainer.backends.base import Hooks, TrainResult, adapter_manifest, save_adapter_atomically
from trainer.backends.loop import run_loop
from trainer.spec import TrainSpec


def pack(items: Sequence[Tokenized], device: Any) -> dict[str, Any]:
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for t in items:
        ids += t.input_ids
        labels += [IGNORE_INDEX, *t.labels[1:]]  # never learn across an example boundary
        positions += list(range(len(t.input_ids)))
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def packed_forward_sum(model: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
    """Summed loss over the answer tokens of a packed micro-batch. The model's own loss (Unsloth's
    fused cross-entropy) is a mean over supervised positions, so it is scaled back to a sum."""
    batch = pack(items, next(model.parameters()).device)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    out = model(**batch)
    return out.loss * n, n


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
    torch.cuda.reset_peak_memory_stats()
    result = run_loop(
        model=model, optimizer=optimizer, encoded=encoded, batch_size=spec.batch_size,
        micro_batch_size=spec.micro_batch_size, n_epochs=spec.n_epochs, max_steps=spec.max_steps,
        warmup_ratio=spec.warmup_ratio, seed=spec.seed, forward_sum=packed_forward_sum,
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
