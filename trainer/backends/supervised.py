"""The summed cross-entropy of a micro-batch over its answer tokens, with the output layer applied
only where a label is: the decoder's hidden states at the positions that predict an answer token,
then the output layer and the loss on those rows alone.

Answers are a small part of each example (a label of a few tokens after a review of a hundred; an
eighth of a seed example), so the output layer, the largest single matrix of a small model and
a 128k-row product per token for Llama-3.1, costs a fraction of what every position would. Both
backends use it: on the CPU it raised throughput by half; on the H200 (Unsloth, whose own fused
loss already avoids holding every position's logits) no gain was measured (bench/README.md,
"Training on the H200"). Positions are computed on the host (``loop.supervised_positions``),
so nothing here waits for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.chat import Tokenized
from trainer.backends.loop import pad_batch, supervised_positions

# Config fields of models whose logits are transformed after the output layer (Gemma 2's soft
# cap, Cohere's and Granite's scales): those keep the model's own loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_output_layer(config: Any) -> bool:
    """Whether the loss is cross-entropy on ``output_layer(hidden)`` with nothing in between."""
    return all(getattr(config, name, None) in (None, 0, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def supervised_loss_sum(
    model: Any, items: Sequence[Tokenized], pad_id: int, embeddings: Any = None
) -> tuple[Any, int]:
    """``(summed loss over the answer tokens, their count)`` for right-padded ``items``;
    ``embeddings``: the input embeddings gathered on the host (``pad_batch``)."""
    import torch.nn.functional as F

    inner = unwrap(model)
    out_layer = inner.get_output_embeddings()
    device = out_layer.weight.device
    batch = pad_batch(items, pad_id, device, embeddings)
    labels = batch.pop("labels")  # the loss below reads the host's positions instead
    rows, width = labels.shape
    positions, targets = supervised_positions(items, width, device)
    hidden = inner.get_decoder()(**batch, use_cache=False).last_hidden_state
    picked = hidden.reshape(rows * width, -1).index_select(0, positions)
    logits = out_layer(picked).float()
    return F.cross_entropy(logits, targets, reduction="sum"), int(positions.shape[0])
