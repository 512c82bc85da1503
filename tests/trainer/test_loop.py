"""The shared training loop's logic with a tiny model: batching, schedule, OOM recovery,
cancellation; and the gate's decision rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from shared.chat import Tokenized
from trainer.backends.base import JobCancelled, NullHooks, StepInfo
from trainer.backends.loop import length_grouped_batches, linear_warmup, run_loop
from trainer.evaluate import gate


class Recorder(NullHooks):
    def __init__(self, cancel_after: int | None = None) -> None:
        self.steps: list[StepInfo] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cancel_after = cancel_after

    def on_step(self, info: StepInfo) -> None:
        self.steps.append(info)

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        self.events.append((message, data))

    def check_cancelled(self) -> None:
        if self.cancel_after is not None and len(self.steps) >= self.cancel_after:
            raise JobCancelled()


def examples(n: int) -> list[Tokenized]:
    return [Tokenized([1] * (3 + i % 5), [-100] * (2 + i % 5) + [1]) for i in range(n)]


def make_forward(fail_above: int, seen: list[int]) -> Any:
    def forward_sum(model: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
        seen.append(len(items))
        if len(items) > fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        x = torch.ones(len(items), 4)
        return model(x).sum(), len(items)

    return forward_sum


def test_length_grouped_batches_cover_everything_once_per_epoch() -> None:
    lengths = [10, 200, 11, 190, 12, 180, 13, 170]
    batches = length_grouped_batches(lengths, 2, seed=0, n_epochs=2)
    assert len(batches) == 8
    flat = sorted(i for b in batches for i in b)
    assert flat == sorted(list(range(8)) * 2)
    # Batches pair similar lengths: short with short, long with long.
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 20 for b in batches)
    assert batches == length_grouped_batches(lengths, 2, seed=0, n_epochs=2)  # seeded
    # The GPU backends' order: the costliest batch first (an OOM shows at once, buffers reach
    # their size once), the rest as it was.
    first = length_grouped_batches(lengths, 2, seed=0, n_epochs=2, costliest_first=True)
    assert sorted(lengths[i] for i in first[0]) == [190, 200]
    assert sorted(first[:4]) == sorted(batches[:4]) and first[4:] == batches[4:]
    assert length_grouped_batches([], 2, seed=0, costliest_first=True) == []


def test_linear_warmup_schedule() -> None:
    f = linear_warmup(10, 0.2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]


def test_oom_halves_micro_batch_doubles_accumulation_and_retries() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    seen: list[int] = []
    hooks = Recorder()
    result = run_loop(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), encoded=examples(16),
        batch_size=8, micro_batch_size=8, n_epochs=1, max_steps=None, warmup_ratio=0.0, seed=0,
        forward_sum=make_forward(2, seen), hooks=hooks,
    )
    assert result.steps == 2 and len(hooks.steps) == 2
    assert result.micro_batch_size == 2 and result.grad_accum == 4
    assert [d["micro_batch_size"] for _, d in hooks.events] == [4, 2]
    assert all("out of memory" in m for m, _ in hooks.events)
    assert seen[:3] == [8, 4, 2]  # tried 8, then 4, then 2 which fits


def test_oom_retries_the_step_as_it_was_when_the_backend_freed_memory_of_its_own() -> None:
    """A backend that can free memory of its own (layers that kept their activations) is asked
    first: the step is retried at the same micro-batch, and only a second OOM halves it."""
    model = torch.nn.Linear(4, 1)
    seen: list[int] = []
    answers = iter(["the 3 layers that kept their activations checkpoint again"])
    hooks = Recorder()
    result = run_loop(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), encoded=examples(8),
        batch_size=8, micro_batch_size=8, n_epochs=1, max_steps=None, warmup_ratio=0.0, seed=0,
        forward_sum=make_forward(4, seen), hooks=hooks, on_oom=lambda: next(answers, None),
    )
    assert seen[:3] == [8, 8, 4]  # retried at 8 once, then halved
    assert result.micro_batch_size == 4 and len(hooks.steps) == 1
    assert [m for m, _ in hooks.events] == [
        "CUDA out of memory at step 1: the 3 layers that kept their activations checkpoint "
        "again; retrying the step",
        "CUDA out of memory at step 1: micro-batch 8 -> 4, gradient accumulation 1 -> 2; "
        "retrying the step"]


def test_oom_at_micro_batch_one_is_raised() -> None:
    model = torch.nn.Linear(4, 1)
    with pytest.raises(torch.OutOfMemoryError):
        run_loop(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            encoded=examples(4), batch_size=4, micro_batch_size=None, n_epochs=1, max_steps=None,
            warmup_ratio=0.0, seed=0, forward_sum=make_forward(0, []), hooks=Recorder(),
        )


def test_split_does_not_change_the_gradient() -> None:
    def grads(micro: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)

        def fwd(m: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
            x = torch.tensor([[float(len(t.input_ids))] * 4 for t in items])
            return (m(x) ** 2).sum(), len(items)

        before = model.weight.detach().clone()
        run_loop(model=model, optimizer=opt, encoded=examples(8), batch_size=8,
                 micro_batch_size=micro, n_epochs=1, max_steps=1, warmup_ratio=0.0, seed=0,
                 forward_sum=fwd, hooks=Recorder(), max_grad_norm=0.0)
        return model.weight.detach() - before

    assert torch.allclose(grads(8), grads(1), atol=1e-6)


def test_cancellation_stops_at_the_next_step() -> None:
    model = torch.nn.Linear(4, 1)
    hooks = Recorder(cancel_after=3)
    with pytest.raises(JobCancelled):
        run_loop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 encoded=examples(40), batch_size=2, micro_batch_size=None, n_epochs=1,
                 max_steps=None, warmup_ratio=0.0, seed=0, forward_sum=make_forward(99, []),
                 hooks=hooks)
    assert len(hooks.steps) == 3


def test_a_step_whose_loss_is_on_its_way_is_reported_once_the_next_is_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA the loss reaches the host asynchronously: step k is reported after step k + 1's
    work is queued, every step is reported once, in order, with the loss it would have had."""
    from trainer.backends import loop

    def run(late: bool) -> tuple[list[str], list[StepInfo]]:
        class Arriving(loop.HostScalar):
            pending = late  # as a CUDA copy would be

        monkeypatch.setattr(loop, "HostScalar", Arriving)
        order: list[str] = []

        class Hooks(Recorder):
            def on_step(self, info: StepInfo) -> None:
                order.append(f"report {info.step}")
                super().on_step(info)

        def fwd(m: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
            order.append("forward")
            x = torch.tensor([[float(len(t.input_ids))] * 4 for t in items])
            return (m(x) ** 2).sum(), len(items)

        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        hooks = Hooks()
        run_loop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                 encoded=examples(6), batch_size=2, micro_batch_size=None, n_epochs=1,
                 max_steps=None, warmup_ratio=0.0, seed=0, forward_sum=fwd, hooks=hooks)
        return order, hooks.steps

    order, steps = run(late=True)
    assert order == ["forward", "forward", "report 1", "forward", "report 2", "report 3"]
    now_order, now_steps = run(late=False)
    assert now_order == ["forward", "report 1", "forward", "report 2", "forward", "report 3"]
    assert [s.loss for s in steps] == [s.loss for s in now_steps]
    assert [s.tokens for s in steps] == [s.tokens for s in now_steps]


def test_gate_rule() -> None:
    assert gate(0.95).passed
    assert not gate(0.94).passed
    assert gate(0.96, stable_score=0.97, tolerance=0.01).passed
    assert not gate(0.96, stable_score=0.975, tolerance=0.01).passed
    d = gate(0.5, threshold=0.4, stable_score=0.8)
    assert not d.passed and "regresses" in d.reason
    assert gate(0.5, threshold=0.4, stable_score=None).passed


def test_gpu_micro_batches_are_padded_rows_that_keep_examples_apart() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.backends.gpu import padded_forward_sum
    from trainer.backends.loop import pad_batch

    a = Tokenized([5, 6, 7, 8], [-100, -100, 7, 8])
    b = Tokenized([9, 10], [-100, 10])
    batch = pad_batch([a, b], 0, "cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).eval()
    fwd = padded_forward_sum(0)
    with torch.no_grad():
        together, n = fwd(model, [a, b])
        alone = [fwd(model, [t]) for t in (a, b)]
    # Loss on answer tokens only (a: 2, b: 1), and each example sees only itself: the padded
    # micro-batch gives exactly the sum of the examples' losses computed one by one.
    assert n == 3 and [k for _, k in alone] == [2, 1]
    assert torch.allclose(together, alone[0][0] + alone[1][0], atol=1e-5)


def test_output_layer_at_answer_tokens_only_gives_the_models_loss_and_gradients() -> None:
    """The loss that applies the output layer only where a label is (both backends' default)
    equals the model's own loss over every position, summed, and so do the LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.backends.gpu import answer_forward_sum, padded_forward_sum
    from trainer.backends.loop import supervised_positions

    a = Tokenized([5, 6, 7, 8, 9], [-100, -100, 7, 8, -100])
    b = Tokenized([9, 10, 11], [-100, 10, 11])
    pos, tgt = supervised_positions([a, b], 5, "cpu")
    # Row 0 predicts tokens 2 and 3 from positions 1 and 2; row 1 (offset 5) tokens 1 and 2.
    assert pos.tolist() == [1, 2, 5, 6] and tgt.tolist() == [7, 8, 10, 11]

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))

    def loss_and_grads(fwd: Any) -> tuple[Any, int, list[Any]]:
        model.zero_grad(set_to_none=True)
        loss, n = fwd(model, [a, b])
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole = padded_forward_sum(0)
    l1, n1, g1 = loss_and_grads(whole)
    l2, n2, g2 = loss_and_grads(answer_forward_sum(0, fallback=whole))
    assert n1 == n2 == 4
    assert torch.allclose(l1, l2, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(g1, g2, strict=True))


def test_input_embeddings_gathered_on_the_host_give_the_same_loss_and_gradients() -> None:
    """``input_embeddings = "host"``: the table leaves the model, each micro-batch's rows come
    from the host copy, and the loss and the LoRA gradients are those of the model's own lookup,
    for both losses and through reentrant gradient checkpointing (which back-propagates only
    into layers whose input requires grad); the table comes back intact."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.backends.embeddings import HostEmbeddings
    from trainer.backends.gpu import answer_forward_sum, padded_forward_sum

    items = [Tokenized([5, 6, 7, 8, 9], [-100, -100, 7, 8, -100]),
             Tokenized([9, 10, 11], [-100, 10, 11])]

    def model_of(tied: bool) -> Any:
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
            tie_word_embeddings=tied))
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True})
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                               init_lora_weights=False)).train()

    assert not HostEmbeddings.applies(model_of(tied=True))  # the output layer needs the table
    model = model_of(tied=False)
    assert HostEmbeddings.applies(model)

    def loss_and_grads(fwd: Any) -> tuple[Any, list[Any]]:
        model.zero_grad(set_to_none=True)
        loss, _ = fwd(model, items)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        return loss.detach(), [g.clone() for g in grads]

    table = model.get_input_embeddings().weight.detach().clone()
    whole = padded_forward_sum(0)
    expected = [loss_and_grads(whole), loss_and_grads(answer_forward_sum(0, whole))]
    host = HostEmbeddings(model)
    assert model.get_input_embeddings().weight.numel() == 0  # gone from the model
    on_host = padded_forward_sum(0, host)
    got = [loss_and_grads(on_host), loss_and_grads(answer_forward_sum(0, on_host, host))]
    for (l1, g1), (l2, g2) in zip(expected, got, strict=True):
        assert torch.allclose(l1, l2, atol=1e-6)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(g1, g2, strict=True))
    host.restore()
    assert torch.equal(model.get_input_embeddings().weight, table)


def test_gpu_backends_default_the_cuda_allocator_to_expandable_segments() -> None:
    from trainer.backends import cuda_allocator_defaults

    env: dict[str, str] = {}
    cuda_allocator_defaults(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # an operator's own wins
        env = {name: "max_split_size_mb:256"}
        cuda_allocator_defaults(env)
        assert env == {name: "max_split_size_mb:256"}


def test_gpu_options_refuse_unknown_choices() -> None:
    from trainer.backends import GpuOptions

    assert GpuOptions() == GpuOptions("offload", "adamw", "host", "auto", 0.0)
    with pytest.raises(ValueError, match="optimizer"):
        GpuOptions(optimizer="sgd")
    with pytest.raises(ValueError, match="checkpointing"):
        GpuOptions(checkpointing="disk")
    with pytest.raises(ValueError, match="input_embeddings"):
        GpuOptions(input_embeddings="disk")
    with pytest.raises(ValueError, match="compile_layers"):
        GpuOptions(compile_layers="sometimes")
    with pytest.raises(ValueError, match="memory_target_gib"):
        GpuOptions(memory_target_gib=-1)


def test_layers_are_compiled_for_jobs_long_enough_to_repay_the_compile() -> None:
    from shared.job_spec import TrainSpec
    from trainer.backends import GpuOptions
    from trainer.backends.lora import planned_tokens

    auto = GpuOptions()
    assert not auto.compiles(GpuOptions.COMPILE_FROM_TOKENS - 1)
    assert auto.compiles(GpuOptions.COMPILE_FROM_TOKENS)
    assert GpuOptions(compile_layers="on").compiles(1)
    assert not GpuOptions(compile_layers="off").compiles(10**12)
    # The seed workload (5,000 examples of about 400 tokens, one epoch) is not compiled.
    encoded = [Tokenized([1] * (300 + i % 201), [1] * (300 + i % 201)) for i in range(5000)]
    spec = TrainSpec(job_id="t", name="t", base_model="-", training_file="-", batch_size=16)
    assert planned_tokens(encoded, spec) == sum(300 + i % 201 for i in range(5000))
    assert not auto.compiles(planned_tokens(encoded, spec))
    long = spec.model_copy(update={"n_epochs": 12})
    assert auto.compiles(planned_tokens(encoded, long))
    capped = spec.model_copy(update={"max_steps": 10})  # 160 examples of the mean length
    assert planned_tokens(encoded, capped) == planned_tokens(encoded, spec) * 160 // 5000
