"""Unit tests of iteration-level batching with a fake runner.

The fake runner keeps, per slot, the tokens whose "KV" it holds, checks every decode writes at the
slot's own next position, and picks the next token from the slot's whole history (and adapter).
So a sequence gets the same tokens alone or in any batch only if slots, positions and compaction
are right.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.embedded.scheduler import Scheduler, Sequence, StepOutput
from engine.embedded.token_sampling import SamplingParams

VOCAB = 50
EOS = 0
EOS_TRIGGER = 42  # the fake model answers EOS after this token


def next_token(history: list[int], adapter: str | None) -> int:
    if history and history[-1] == EOS_TRIGGER:
        return EOS
    salt = 0 if adapter is None else len(adapter)
    return 1 + (sum(history) * 7 + 3 + salt) % (VOCAB - 1)


def one_hot(tokens: list[int]) -> torch.Tensor:
    logits = torch.full((len(tokens), VOCAB), -10.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return logits


class FakeRunner:
    eos_token_ids = {EOS}

    def __init__(self, slots: int) -> None:
        self.kv: list[list[int]] = [[] for _ in range(slots)]
        self.adapter: list[str | None] = [None] * slots
        self.decode_sizes: list[int] = []
        self.prefills: list[int] = []

    def prefill(self, rows: list[tuple[int, list[int], str | None]]) -> torch.Tensor:
        self.prefills.append(len(rows))
        for slot, ids, adapter in rows:
            self.kv[slot] = list(ids)
            self.adapter[slot] = adapter
        return one_hot([next_token(self.kv[s], a) for s, _, a in rows])

    def decode(self, tokens: list[int], positions: list[int],
               adapters: list[str | None]) -> torch.Tensor:
        self.decode_sizes.append(len(tokens))
        out = []
        for slot, (tok, pos, adapter) in enumerate(zip(tokens, positions, adapters, strict=True)):
            assert pos == len(self.kv[slot]), "token written at the wrong position"
            assert adapter == self.adapter[slot], "row ran with another row's adapter"
            self.kv[slot].append(tok)
            out.append(next_token(self.kv[slot], adapter))
        return one_hot(out)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        assert len(self.kv[src]) == length
        self.kv[dst] = list(self.kv[src])
        self.adapter[dst] = self.adapter[src]


def detok(ids: list[int]) -> str:
    return "".join(chr(ord("a") + (t % 26)) for t in ids if t != EOS)


def expected(prompt: list[int], n: int, adapter: str | None = None) -> list[int]:
    hist, out = list(prompt), []
    for _ in range(n):
        t = next_token(hist, adapter)
        out.append(t)
        if t == EOS:
            break
        hist.append(t)
    return out


def make(max_num_seqs: int = 4, max_model_len: int = 1000) -> tuple[Scheduler, FakeRunner]:
    runner = FakeRunner(max_num_seqs)
    return Scheduler(runner, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                     decode=detok), runner


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def run(sched: Scheduler, limit: int = 1000) -> dict[str, list[StepOutput]]:
    outs: dict[str, list[StepOutput]] = {}
    for _ in range(limit):
        if not sched.has_work():
            break
        for o in sched.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens_of(outs: list[StepOutput]) -> list[int]:
    return [t.token_id for o in outs for t in o.tokens]


def test_single_request_runs_to_max_tokens() -> None:
    sched, _ = make()
    sched.add(Sequence("r", [3, 5, 8], greedy(6)))
    outs = run(sched)["r"]
    assert tokens_of(outs) == expected([3, 5, 8], 6)
    assert outs[-1].finish_reason == "length"
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
    assert outs[-1].completion_tokens == 6 and outs[-1].prompt_tokens == 3
    assert "".join(o.text for o in outs) == detok(expected([3, 5, 8], 6))


def test_concurrent_requests_share_steps_and_match_solo_results() -> None:
    sched, runner = make(max_num_seqs=4)
    prompts = {f"r{i}": [i + 1] * (i + 2) for i in range(6)}
    lengths = {rid: 5 + 3 * i for i, rid in enumerate(prompts)}
    adapters = {"r1": "ad-one", "r4": "ad-four-x"}
    # Requests arrive between steps, finish at different times, and exceed max_num_seqs.
    for rid in ("r0", "r1"):
        sched.add(Sequence(rid, prompts[rid], greedy(lengths[rid]), adapters.get(rid)))
    outs: dict[str, list[StepOutput]] = {}
    for step in range(200):
        if step == 2:
            for rid in ("r2", "r3", "r4", "r5"):
                sched.add(Sequence(rid, prompts[rid], greedy(lengths[rid]), adapters.get(rid)))
        assert len(sched.running) <= 4
        for o in sched.step():
            outs.setdefault(o.request_id, []).append(o)
        if step > 2 and not sched.has_work():
            break
    for rid, prompt in prompts.items():
        assert tokens_of(outs[rid]) == expected(prompt, lengths[rid], adapters.get(rid)), rid
        assert outs[rid][-1].finish_reason == "length"
    assert max(runner.decode_sizes) == 4  # batched, and never above max_num_seqs
    assert max(runner.prefills) >= 2  # arrivals in one step are prefilled together


def test_abort_frees_the_slot_and_the_rest_continue() -> None:
    sched, _ = make(max_num_seqs=3)
    for rid, prompt in (("a", [1, 2]), ("b", [3]), ("c", [4, 4, 4])):
        sched.add(Sequence(rid, prompt, greedy(12)))
    outs: dict[str, list[StepOutput]] = {}
    for _ in range(3):
        for o in sched.step():
            outs.setdefault(o.request_id, []).append(o)
    sched.abort("a")  # slot 0: the last slot moves into it
    sched.add(Sequence("d", [9, 9], greedy(4)))
    rest = run(sched)
    for rid, o in rest.items():
        outs.setdefault(rid, []).extend(o)
    assert "a" not in rest
    assert len(tokens_of(outs["a"])) < 12
    assert tokens_of(outs["b"]) == expected([3], 12)
    assert tokens_of(outs["c"]) == expected([4, 4, 4], 12)
    assert tokens_of(outs["d"]) == expected([9, 9], 4)
    assert not sched.running and not sched.waiting


def test_abort_of_a_waiting_request() -> None:
    sched, _ = make(max_num_seqs=1)
    sched.add(Sequence("a", [1], greedy(3)))
    sched.add(Sequence("b", [2], greedy(3)))
    sched.step()
    sched.abort("b")
    outs = run(sched)
    assert "b" not in outs
    assert not sched.has_work()


def test_eos_finishes_with_stop_and_no_text() -> None:
    sched, _ = make()
    sched.add(Sequence("r", [7, EOS_TRIGGER], greedy(10)))
    outs = run(sched)["r"]
    assert tokens_of(outs) == [EOS]
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == ""


def test_ignore_eos_keeps_going() -> None:
    sched, _ = make()
    sched.add(Sequence("r", [7, EOS_TRIGGER], greedy(3, ignore_eos=True)))
    outs = run(sched)["r"]
    assert len(tokens_of(outs)) == 3 and outs[-1].finish_reason == "length"


def test_stop_string_is_cut_and_never_streamed() -> None:
    full = detok(expected([3, 5, 8], 30))
    stop = full[10:12]
    cut = full.find(stop)
    sched, _ = make()
    sched.add(Sequence("r", [3, 5, 8], greedy(30, stop=[stop])))
    outs = run(sched)["r"]
    assert outs[-1].finish_reason == "stop"
    streamed = "".join(o.text for o in outs)
    assert streamed == full[:cut]
    for i in range(len(outs)):  # no prefix of the stream ever held stop text
        assert stop not in "".join(o.text for o in outs[: i + 1])


def test_context_limit_finishes_with_length() -> None:
    sched, _ = make(max_model_len=8)
    sched.add(Sequence("r", [1, 2, 3, 4, 5], greedy(100)))
    outs = run(sched)["r"]
    assert outs[-1].finish_reason == "length"
    assert outs[-1].completion_tokens == 3  # 5 prompt + 3 = max_model_len


def test_seeded_sampling_is_reproducible() -> None:
    def sample_run(seed: int) -> list[int]:
        sched, _ = make()
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=seed)
        sched.add(Sequence("r", [1, 2], params))
        # Flat logits so sampling, not the fake model, decides.
        sched.runner.prefill = lambda rows: torch.zeros(len(rows), VOCAB)  # type: ignore
        sched.runner.decode = lambda t, p, a: torch.zeros(len(t), VOCAB)  # type: ignore
        return tokens_of(run(sched)["r"])

    assert sample_run(1) == sample_run(1)
    assert sample_run(1) != sample_run(2)


@pytest.mark.parametrize("top_p", [0.05, 1.0])
def test_top_p_keeps_the_nucleus(top_p: float) -> None:
    from engine.embedded.token_sampling import make_generator, sample

    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
    gen = make_generator(0)
    seen = {sample(logits, [params], [gen])[0].token_id for _ in range(200)}
    assert seen == {0} if top_p < 0.5 else len(seen) >= 2


def test_logprobs_are_of_the_raw_distribution() -> None:
    from engine.embedded.token_sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, logprobs=2)
    choice = sample(logits, [params], [None])[0]
    ref = torch.log_softmax(logits[0], -1)
    assert choice.token_id == 0
    assert choice.logprob == pytest.approx(float(ref[0]))
    assert [t for t, _ in choice.top or []] == [0, 1]


def test_incremental_detokenization_matches_full_decode(default_model_dir: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids, skip_special_tokens=True))

    sched = Scheduler(FakeRunner(1), max_num_seqs=1, max_model_len=100, decode=decode)
    text = "Héllo wörld — 日本語 🐉🔥\n\n  spaces <|im_end|> after"
    ids = tok.encode(text)
    seq = Sequence("r", [1], greedy(100))
    for t in ids:  # byte-level pieces of one character arrive in separate steps
        seq.output_ids.append(t)
        sched._detokenize(seq)
        assert "\ufffd" not in seq.text
    assert seq.text == decode(ids)


def test_first_token_is_emitted_before_the_decode_step() -> None:
    """A new request's first token (from its prefill) reaches ``emit`` before the same step's
    decode runs; the step's return value holds only what the decode produced."""
    sched, runner = make()
    sched.add(Sequence("old", [2, 2], greedy(5)))
    sched.step()
    sched.add(Sequence("new", [4, 4, 4], greedy(5)))
    emitted: list[tuple[list[StepOutput], int]] = []
    rest = sched.step(emit=lambda outs: emitted.append((list(outs), len(runner.decode_sizes))))
    decodes_before = len(runner.decode_sizes) - 1
    assert len(emitted) == 1
    first, decodes_then = emitted[0]
    assert decodes_then == decodes_before  # emitted before this step's decode ran
    assert [o.request_id for o in first] == ["new"]
    assert tokens_of(first) == expected([4, 4, 4], 1)
    assert sorted(o.request_id for o in rest) == ["new", "old"]
    assert tokens_of([o for o in rest if o.request_id == "new"]) == expected([4, 4, 4], 2)[1:]
