"""The training loop every backend shares: length-grouped batches, gradient accumulation over
micro-batches, a linear schedule with warm-up, progress hooks (on CUDA a step is reported once the
next is queued, so the host never waits for the device between steps), cancellation at every
step, and CUDA out-of-memory recovery (halve the micro-batch, double accumulation, retry the step;
unless the backend could free memory of its own, as layers that keep their activations: then the
step is retried as it was).

The effective batch (examples per optimizer step) never changes when the micro-batch does, and the
loss is the mean over the step's supervised tokens however the step is split, so an OOM retry
does not change what is learnt.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.chat import IGNORE_INDEX, Tokenized
from trainer.backends.base import Hooks, StepInfo

# ``forward_sum(model, micro_batch) -> (summed loss tensor, n_supervised)``
ForwardSum = Callable[[Any, Sequence[Tokenized]], tuple[Any, int]]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, n_epochs: int = 1,
    costliest_first: bool = False,
) -> list[list[int]]:
    """Indices in batches of similar lengths (little padding), batch order shuffled per epoch.

    Examples are shuffled, cut into groups of 50 batches, sorted by length inside each group, then
    split into batches: similar lengths without always ordering the whole data the same way.
    ``costliest_first`` (the GPU backends) moves the first epoch's costliest batch (rows x longest
    row) to the front, as transformers' length-grouped sampler does: a micro-batch too large for
    the device fails (and is halved) at the first step rather than hours in, and the allocator's
    blocks and Unsloth's pinned checkpoint buffers reach their largest size at once instead of
    growing again at each new longest batch.
    """
    rng = random.Random(seed)
    out: list[list[int]] = []
    for epoch in range(n_epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        group = batch_size * 50
        batches = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g : g + group], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        if costliest_first and epoch == 0 and batches:  # epochs keep their examples
            cost = [len(b) * max(lengths[i] for i in b) for b in batches]
            batches.insert(0, batches.pop(cost.index(max(cost))))
        out += batches
    return out


def pad_batch(
    items: Sequence[Tokenized], pad_id: int, device: Any, embeddings: Any = None
) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` tensors; with ``embeddings``
    (``trainer.backends.embeddings.HostEmbeddings``), ``inputs_embeds`` gathered on the host
    instead of ``input_ids``."""
    import torch

    width = max(len(t.input_ids) for t in items)
    # Built as one host tensor and copied once (pinned and asynchronous on CUDA), so the host
    # prepares the next micro-batch while the device still works on this one.
    def padded(seq: Sequence[int], fill: int) -> list[int]:
        return [*seq, *[fill] * (width - len(seq))]

    host = torch.tensor([[padded(t.input_ids, pad_id) for t in items],
                         [padded(t.labels, IGNORE_INDEX) for t in items],
                         [padded([1] * len(t.input_ids), 0) for t in items]], dtype=torch.long)
    if embeddings is not None:
        labels, mask = _to_device(host[1:], device)
        return {"inputs_embeds": embeddings(host[0]), "attention_mask": mask, "labels": labels}
    ids, labels, mask = _to_device(host, device)  # three contiguous (rows, width)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def supervised_positions(items: Sequence[Tokenized], width: int, device: Any) -> tuple[Any, Any]:
    """Where the answer tokens are predicted, computed on the host: the flat positions
    ``row * width + t`` whose next token ``t + 1`` is labelled, and those labels. Indexing the
    hidden states with them needs no device-to-host sync (a boolean mask on the device would)."""
    import torch

    positions: list[int] = []
    targets: list[int] = []
    for row, t in enumerate(items):
        base = row * width - 1
        for i, label in enumerate(t.labels):
            if i > 0 and label != IGNORE_INDEX:
                positions.append(base + i)
                targets.append(label)
    pos, tgt = _to_device(torch.tensor([positions, targets], dtype=torch.long), device)
    return pos, tgt


def _to_device(host: Any, device: Any) -> Any:
    import torch

    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def linear_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


class Eta:
    """Seconds of training left, from the work left rather than the steps left.

    Length-grouped batches differ a lot in cost (a batch of long examples takes several times a
    batch of short ones), so a step's cost is taken as its padded tokens (rows x longest row, what
    the forward pass computes over) and the estimate is cost left x seconds per unit of cost.

    Warm-up is not one step: in a fresh worker the first steps of a job were measured at 14.5,
    15.2 and 46.7 s before settling at 0.6 s (allocator and kernel warm-up, a machine shared with
    the model's load), and an average over all steps since the first then said 4.7 times the
    truth at step 5. The rate is therefore the lower median of the last ``WINDOW`` steps' seconds
    per unit of cost, leaving out the first step: a warm-up of k slow steps stops counting once
    k + 1 steps of the settled pace follow it, and a lasting change of pace is followed within
    half a window.
    """

    WINDOW = 9

    def __init__(self, step_costs: Sequence[int]) -> None:
        self.costs = list(step_costs)
        self.left = sum(self.costs)
        self._last_end: float | None = None
        self._per_cost: list[float] = []  # seconds per unit of cost of each step after the first

    def update(self, step: int, now: float, start: float) -> float:
        """Record that step ``step`` (1-based) ended at ``now``; returns seconds left."""
        cost = max(1, self.costs[step - 1])
        self.left -= self.costs[step - 1]
        took = now - (self._last_end if self._last_end is not None else start)
        self._last_end = now
        if step == 1:
            per_cost = took / cost  # all there is yet: warm-up included
        else:
            self._per_cost.append(max(took, 0.0) / cost)
            recent = sorted(self._per_cost[-self.WINDOW:])
            per_cost = recent[(len(recent) - 1) // 2]  # the lower median
        return max(0.0, self.left * per_cost)


class HostScalar:
    """A one-element tensor's value, copied to the host without waiting for the device: ``get()``
    waits for that copy alone (a CUDA event), not for the work queued after it."""

    def __init__(self, value: Any) -> None:
        self.event: Any = None
        if isinstance(value, (int, float)):
            self.host: Any = float(value)
            return
        if value.device.type == "cuda":
            import torch

            self.host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self.host.copy_(value.reshape(()), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value

    @property
    def pending(self) -> bool:
        """Whether the value may still be on its way (then a step is reported one step late)."""
        return self.event is not None

    def get(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


@dataclass
class _StepDone:
    step: int  # 1-based
    loss_sum: HostScalar  # summed over the step's supervised tokens
    n_sup: int
    lr: float
    tokens: int  # input tokens of the step, padding excluded


@dataclass
class LoopResult:
    steps: int
    tokens: int
    losses: list[float]
    micro_batch_size: int
    grad_accum: int


def run_loop(
    *,
    model: Any,
    optimizer: Any,
    encoded: Sequence[Tokenized],
    batch_size: int,
    micro_batch_size: int | None,
    n_epochs: int,
    max_steps: int | None,
    warmup_ratio: float,
    seed: int,
    forward_sum: ForwardSum,
    hooks: Hooks,
    max_grad_norm: float = 1.0,
    on_oom: Callable[[], str | None] | None = None,
    after_step: Callable[[int], None] | None = None,
    costliest_first: bool = False,
) -> LoopResult:
    import torch

    batches = length_grouped_batches(
        [len(t.input_ids) for t in encoded], batch_size, seed=seed, n_epochs=n_epochs,
        costliest_first=costliest_first,
    )
    steps_per_epoch = max(1, math.ceil(len(encoded) / batch_size))
    total = min(len(batches), max_steps) if max_steps else len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(total, warmup_ratio))
    eta = Eta([len(b) * max(len(encoded[i].input_ids) for i in b) for b in batches[:total]])
    micro = min(micro_batch_size or batch_size, batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    tokens = 0
    start = time.monotonic()
    # Steps done but not yet reported. On CUDA a step is reported once the next one is queued:
    # its loss is copied to the host without waiting, so the host never drains the device between
    # steps (a sync at each step's end left the GPU idle while the host prepared the next one).
    done: deque[_StepDone] = deque()

    def report(d: _StepDone) -> None:
        nonlocal tokens
        tokens += d.tokens
        losses.append(d.loss_sum.get() / max(1, d.n_sup))
        now = time.monotonic()
        elapsed = now - start
        eta_s = eta.update(d.step, now, start)
        if after_step is not None:
            after_step(d.step)
        hooks.on_step(
            StepInfo(
                step=d.step,
                total_steps=total,
                epoch=d.step / steps_per_epoch,
                loss=losses[-1],
                lr=d.lr,
                tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                eta_s=eta_s,
                elapsed_s=elapsed,
                tokens=tokens,
            )
        )

    model.train()
    for step in range(total):
        hooks.check_cancelled()
        items = [encoded[i] for i in batches[step]]
        n_sup = sum(t.n_supervised for t in items)
        while True:
            try:
                optimizer.zero_grad(set_to_none=True)
                total_loss: Any = 0.0
                for m in range(0, len(items), micro):
                    loss_sum, _ = forward_sum(model, items[m : m + micro])
                    # Divide by the whole step's supervised tokens: the same gradient for any split.
                    (loss_sum / max(1, n_sup)).backward()
                    # Summed on the device: read once a step (below), not once a micro-batch.
                    total_loss = total_loss + loss_sum.detach()
                break
            except Exception as exc:
                if not is_oom(exc):
                    raise
                optimizer.zero_grad(set_to_none=True)
                # What the backend freed besides the allocator's cache, if anything: then the step
                # is retried at the same micro-batch (each such answer is given once).
                freed = on_oom() if on_oom else None
                if freed:
                    hooks.on_event(f"CUDA out of memory at step {step + 1}: {freed}; retrying "
                                   f"the step", {"step": step + 1, "freed": freed})
                    continue
                if micro == 1:
                    raise
                old = micro
                micro = max(1, micro // 2)
                hooks.on_event(
                    f"CUDA out of memory at step {step + 1}: micro-batch {old} -> {micro}, "
                    f"gradient accumulation {math.ceil(batch_size / old)} -> "
                    f"{math.ceil(batch_size / micro)}; retrying the step",
                    {"step": step + 1, "micro_batch_size": micro,
                     "grad_accum": math.ceil(batch_size / micro)},
                )
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        loss_host = HostScalar(total_loss)
        done.append(_StepDone(step + 1, loss_host, n_sup, lr,
                              sum(len(t.input_ids) for t in items)))
        del items, loss_sum, total_loss  # no tensor of this step is kept alive into the next
        while len(done) > (1 if loss_host.pending else 0):
            report(done.popleft())
    while done:
        report(done.popleft())
    return LoopResult(total, tokens, losses, micro, math.ceil(batch_size / micro))
