"""Iteration-level (continuous) batching.

Each :meth:`Scheduler.step` is one iteration: drop aborted sequences, admit waiting ones into free
slots (up to ``max_num_seqs``) and prefill them together, then run one decode step for every
running sequence, sample, detokenize, check the stop conditions and free finished sequences. A
request thus joins and leaves the batch between any two tokens. A new request's first token comes
from its prefill and is handed out at once (``emit``), not after the decode step that follows.

Running sequences always sit in slots ``0..n-1`` in list order; freeing one moves the last into its
slot (see :mod:`.kv_cache`). The scheduler is plain Python over a :class:`Runner`, so its unit
tests use a fake runner.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.embedded.runner import Runner
from engine.embedded.token_sampling import SamplingParams, TokenChoice, make_generator, sample

# Prompt tokens prefilled in one iteration at most (beyond the first prompt), so a burst of long
# prompts does not stall the running streams for seconds.
MAX_PREFILL_TOKENS = 2048


@dataclass
class StepOutput:
    """What one iteration produced for one request."""

    request_id: str
    text: str  # new text since the previous output (may be "" while held back)
    tokens: list[TokenChoice]  # tokens generated since the previous output
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | None  # the stop string that ended it (None for EOS or length)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    pending: list[TokenChoice] = field(default_factory=list)  # tokens not yet reported
    text: str = ""  # detokenized output (stop text removed once found)
    # Incremental detokenization: text of output_ids[prefix_offset:read_offset] is known, so
    # each step decodes a few tokens, not the whole output.
    prefix_offset: int = 0
    read_offset: int = 0
    prefix_text: str = ""
    sent: int = 0  # characters of ``text`` already reported
    finish_reason: str | None = None
    stop_reason: str | None = None
    first_token_at: float | None = None
    admitted_at: float | None = None  # monotonic seconds when it got a batch slot
    trace: Any = None  # the caller's OpenTelemetry context (engine.tracing); None: untraced
    generator: Any = None

    @property
    def cached_len(self) -> int:
        """Positions already in the KV cache (the last sampled token is not yet fed)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


StepHook = Callable[["Scheduler", list[Sequence], list[Sequence]], None]


class Scheduler:
    def __init__(self, runner: Runner, *, max_num_seqs: int, max_model_len: int,
                 decode: Callable[[list[int]], str]) -> None:
        self.runner = runner
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.detokenize = decode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborted: set[str] = set()
        # Called after each step with (scheduler, newly admitted, finished) — metrics.
        self.on_step: StepHook | None = None

    # -- requests ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[str]:
        return {s.adapter for s in (*self.running, *self.waiting) if s.adapter}

    # -- one iteration -------------------------------------------------------------------------

    def step(self, emit: Callable[[list[StepOutput]], None] | None = None) -> list[StepOutput]:
        """One iteration; returns its outputs. With ``emit``, the prefill's outputs (new
        requests' first tokens) go to ``emit`` as soon as they exist, before the decode step
        (a whole decode step sooner to the client), and the return value holds the rest."""
        outputs: list[StepOutput] = []
        finished: list[Sequence] = []
        if self._aborted:
            self._drop_aborted(finished)
        admitted = self._admit()
        if admitted:
            logits = self.runner.prefill([(slot, s.prompt_ids, s.adapter) for slot, s in admitted])
            self._advance([s for _, s in admitted], logits)
            self._report(outputs, finished)
            if emit is not None and outputs:
                emit(outputs)
                outputs = []
        if self.running:
            # Slots 0..n-1 are exactly the running list, new rows included (their first token came
            # from the prefill, their second comes now).
            logits = self.runner.decode(
                [s.output_ids[-1] for s in self.running],
                [s.cached_len for s in self.running],
                [s.adapter for s in self.running],
            )
            self._advance(self.running, logits)
            self._report(outputs, finished)
        if self.on_step is not None:
            self.on_step(self, [s for _, s in admitted], finished)
        return outputs

    def _report(self, outputs: list[StepOutput], finished: list[Sequence]) -> None:
        done = []
        for s in self.running:
            out = self._collect(s)
            if out is not None:
                outputs.append(out)
            if s.finish_reason is not None:
                done.append(s)
        finished.extend(done)
        self._free(done)

    def _drop_aborted(self, finished: list[Sequence]) -> None:
        ids = self._aborted
        self._aborted = set()
        kept: deque[Sequence] = deque()
        for s in self.waiting:
            if s.request_id in ids:
                s.finish_reason = "abort"
                finished.append(s)
            else:
                kept.append(s)
        self.waiting = kept
        gone = [s for s in self.running if s.request_id in ids]
        for s in gone:
            s.finish_reason = "abort"
            finished.append(s)
        self._free(gone)

    def _admit(self) -> list[tuple[int, Sequence]]:
        admitted: list[tuple[int, Sequence]] = []
        budget = MAX_PREFILL_TOKENS
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and len(seq.prompt_ids) > budget:
                break
            self.waiting.popleft()
            budget -= len(seq.prompt_ids)
            if seq.generator is None and not seq.params.greedy:
                seq.generator = make_generator(seq.params.seed)
            slot = len(self.running)
            seq.admitted_at = time.monotonic()
            self.running.append(seq)
            admitted.append((slot, seq))
        return admitted

    def _advance(self, seqs: list[Sequence], logits: Any) -> None:
        """Append one sampled token to each of ``seqs`` and check its stop conditions."""
        choices = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        for s, choice in zip(seqs, choices, strict=True):
            if s.first_token_at is None:
                s.first_token_at = now
            s.output_ids.append(choice.token_id)
            p = s.params
            if choice.token_id in self.runner.eos_token_ids and not p.ignore_eos:
                s.finish_reason = "stop"
                s.pending.append(choice)
                continue
            s.pending.append(choice)
            self._detokenize(s)
            if p.stop:
                self._check_stop(s)
            if s.finish_reason is None and (
                len(s.output_ids) >= p.max_tokens
                or len(s.prompt_ids) + len(s.output_ids) >= self.max_model_len
            ):
                s.finish_reason = "length"

    def _detokenize(self, s: Sequence) -> None:
        window = self.detokenize(s.output_ids[s.prefix_offset:])
        # No growth (a special token) or a partial UTF-8 character: wait for more tokens.
        if len(window) > len(s.prefix_text) and not window.endswith("\ufffd"):
            s.text += window[len(s.prefix_text):]
            s.prefix_offset, s.read_offset = s.read_offset, len(s.output_ids)
            s.prefix_text = self.detokenize(s.output_ids[s.prefix_offset:s.read_offset])

    @staticmethod
    def _check_stop(s: Sequence) -> None:
        # Only the new tail can hold a new match: search from a little before the reported part.
        start = max(0, s.sent - max(len(x) for x in s.params.stop))
        hits = [(i, x) for i, x in ((s.text.find(x, start), x) for x in s.params.stop) if i >= 0]
        if hits:
            at, stop = min(hits)
            s.text = s.text[:at]
            s.finish_reason, s.stop_reason = "stop", stop

    def _collect(self, s: Sequence) -> StepOutput | None:
        if not s.pending and s.finish_reason is None:
            return None
        if s.finish_reason is not None:
            end = len(s.text)
        else:
            end = len(s.text)
            # Hold back an incomplete UTF-8 character and any tail that could start a stop
            # string, so no stop text ever reaches the client.
            if s.text.endswith("\ufffd"):
                end = len(s.text.rstrip("\ufffd"))
            if s.params.stop:
                hold = max(len(x) for x in s.params.stop) - 1
                end = min(end, max(s.sent, len(s.text) - hold))
        delta = s.text[s.sent:end]
        s.sent = max(s.sent, end)
        tokens, s.pending = s.pending, []
        return StepOutput(s.request_id, delta, tokens, s.finish_reason, s.stop_reason,
                          len(s.prompt_ids), len(s.output_ids))

    def _free(self, gone: list[Sequence]) -> None:
        """Remove ``gone`` from the batch, keeping the survivors in slots 0..n-1."""
        for seq in gone:
            idx = next(i for i, s in enumerate(self.running) if s is seq)
            last = self.running[-1]
            if last is not seq:
                self.runner.move_slot(len(self.running) - 1, idx, last.cached_len)
                self.running[idx] = last
            self.running.pop()
