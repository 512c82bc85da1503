"""The training loop and the GPU backends' optimizers on a CUDA device (the device machine; CI
has no GPU): losses read back asynchronously are the losses, the fused AdamW the GPU backends
default to takes the same steps as the plain one, and input embeddings gathered on the host are
the model's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from shared.chat import Tokenized  # noqa: E402
from shared.job_spec import TrainSpec  # noqa: E402
from trainer.backends.base import NullHooks, StepInfo  # noqa: E402
from trainer.backends.loop import HostScalar, run_loop  # noqa: E402

pytestmark = pytest.mark.gpu


class Steps(NullHooks):
    def __init__(self) -> None:
        self.steps: list[StepInfo] = []

    def on_step(self, info: StepInfo) -> None:
        self.steps.append(info)


def train(device: str, optimizer: Any = None) -> tuple[list[float], Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 1)).to(device)
    opt = optimizer(list(model.parameters())) if optimizer else torch.optim.AdamW(
        model.parameters(), lr=1e-2)
    data = [Tokenized([1] * (3 + i % 7), [-100] * (2 + i % 7) + [1]) for i in range(64)]

    def fwd(m: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
        x = torch.stack([torch.full((8,), len(t.input_ids) / 10.0) for t in items]).to(device)
        return ((m(x) - 1.0) ** 2).sum(), len(items)

    hooks = Steps()
    run_loop(model=model, optimizer=opt, encoded=data, batch_size=8, micro_batch_size=4,
             n_epochs=2, max_steps=None, warmup_ratio=0.1, seed=0, forward_sum=fwd, hooks=hooks)
    assert [s.step for s in hooks.steps] == list(range(1, 17))
    return [s.loss for s in hooks.steps], model


def test_a_cuda_scalar_arrives_without_a_device_sync() -> None:
    x = torch.arange(10.0, device="cuda").sum()
    v = HostScalar(x)
    assert v.pending and v.get() == 45.0
    assert not HostScalar(torch.tensor(3.0)).pending and HostScalar(2.5).get() == 2.5


def test_losses_on_cuda_match_the_cpu_run() -> None:
    cuda, _ = train("cuda")
    cpu, _ = train("cpu")
    assert cuda == pytest.approx(cpu, rel=1e-4, abs=1e-6)
    assert cuda[-1] < cuda[0]


def test_fused_adamw_of_the_gpu_backends_takes_the_plain_steps() -> None:
    from trainer.backends import GpuOptions
    from trainer.backends.unsloth import UnslothBackend

    spec = TrainSpec(job_id="t", name="t", base_model="-", training_file="-",
                     learning_rate=1e-2)
    fused = UnslothBackend(GpuOptions(optimizer="adamw")).optimizer
    losses, model = train("cuda", lambda params: fused(params, spec))
    plain, plain_model = train("cuda", lambda params: torch.optim.AdamW(
        params, lr=1e-2, weight_decay=spec.weight_decay))
    assert losses == pytest.approx(plain, rel=1e-4, abs=1e-6)
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_input_embeddings_from_the_host_reach_the_gpu_intact() -> None:
    """The host gather copies pinned rows without waiting for the device: the loss and the
    LoRA gradients on CUDA are those of the model's own lookup, and the GPU copy of the table
    is freed while it is on the host."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.backends.embeddings import HostEmbeddings
    from trainer.backends.gpu import padded_forward_sum

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
        tie_word_embeddings=False)).cuda()
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).train()
    items = [Tokenized(list(range(1, 1 + n)), [-100] * (n - 3) + [5, 6, 7]) for n in (40, 33)]

    def loss_and_grads(fwd: Any) -> tuple[Any, list[Any]]:
        model.zero_grad(set_to_none=True)
        loss, _ = fwd(model, items)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    l1, g1 = loss_and_grads(padded_forward_sum(0))
    before = torch.cuda.memory_allocated()
    host = HostEmbeddings(model)
    assert before - torch.cuda.memory_allocated() >= 4096 * 256 * 4  # the table left the GPU
    l2, g2 = loss_and_grads(padded_forward_sum(0, host))
    host.restore()
    assert torch.allclose(l1, l2, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g1, g2, strict=True))


def test_layers_kept_under_a_memory_target_stay_under_it_on_cuda() -> None:
    """On the device's allocator: a layer's cost measured in the first step's recomputation, two
    layers kept under a target set for two and a half, the next step's peak under the target."""
    from trainer.backends.keep_layers import MARGIN, KeepLayers

    class Block(torch.nn.Module):  # checkpointed around its whole call, as Unsloth's layers are
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(1024, 4096)
            self.down = torch.nn.Linear(4096, 1024)
            self.gradient_checkpointing = True

        def forward(self, x: Any) -> Any:
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

        def __call__(self, x: Any) -> Any:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(super().__call__, x, use_reentrant=True)
            return super().__call__(x)

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([Block() for _ in range(8)]).cuda().train()

    def step() -> None:
        layers.zero_grad(set_to_none=True)
        h = torch.randn(8, 512, 1024, device="cuda", requires_grad=True)
        for layer in layers:
            h = layer(h)
        h.square().mean().backward()

    keep = KeepLayers(layers, 0, torch.cuda.memory_allocated, torch.cuda.max_memory_allocated)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    # The hidden layer before and after the GELU (8 x 512 x 4096 floats: 64 MiB each, saved for
    # the backward) and the block's output (16 MiB): 144 MiB.
    assert 140 * 2**20 <= keep.layer_cost <= 150 * 2**20
    peak = torch.cuda.max_memory_allocated()
    keep.target = peak + MARGIN + int(2.5 * keep.layer_cost)
    assert keep.plan() == 2
    torch.cuda.reset_peak_memory_stats()
    step()
    assert peak < torch.cuda.max_memory_allocated() <= keep.target
    keep.restore()
