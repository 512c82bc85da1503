"""Layers that keep their activations under a memory target (``trainer.backends.keep_layers``):
the arithmetic; with layers checkpointed by torch's reentrant checkpoint around their whole call
(as Unsloth's are on the device), what one layer saves for its backward is measured during the
first step's recomputation, the last layers that fit stop checkpointing (they then run once a step
instead of twice) and the gradients do not change; and with this machine's transformers, whose
checkpoint runs out of the hooks' sight, no layer is kept."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from trainer.backends.keep_layers import MARGIN, KeepLayers, layers_that_fit  # noqa: E402

GIB = 2**30


def test_layers_that_fit_the_room_left_under_the_target() -> None:
    assert layers_that_fit(8 * GIB, 6 * GIB, GIB // 2, 32) == 3  # 2 GiB - margin: 3 x 0.5 GiB
    assert layers_that_fit(8 * GIB, 6 * GIB, GIB // 2, 32, margin=0) == 4
    assert layers_that_fit(8 * GIB, 8 * GIB - MARGIN, 1, 32) == 0  # the margin is all that is left
    assert layers_that_fit(8 * GIB, 9 * GIB, GIB // 2, 32) == 0  # already past the target
    assert layers_that_fit(64 * GIB, 6 * GIB, GIB // 2, 32) == 32  # at most every layer
    assert layers_that_fit(8 * GIB, 6 * GIB, 0, 32) == 0  # nothing measured: keep none
    assert layers_that_fit(0, 0, GIB // 2, 32) == 0  # no target


class Block(torch.nn.Module):
    """A residual MLP block checkpointed as Unsloth's layers are on the device (transformers 5.17):
    its whole call, hooks included, runs in a reentrant checkpoint when ``gradient_checkpointing``
    is set, first without gradients, then again in the backward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)
        self.gradient_checkpointing = True

    def forward(self, x: Any) -> Any:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))

    def __call__(self, x: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().__call__, x, use_reentrant=True)
        return super().__call__(x)


def blocks(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.ModuleList([Block(32) for _ in range(4)]).train()


class SavedBytes:
    """Bytes of every tensor autograd saves while active: a counter that only grows, so its
    difference across a layer's recomputation is what that layer saved for its backward."""

    def __init__(self) -> None:
        self.total = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: Any) -> Any:
        self.total += t.numel() * t.element_size()
        return t


def step(layers: Any, x: Any) -> list[Any]:
    layers.zero_grad(set_to_none=True)
    h = x.requires_grad_()
    for layer in layers:
        h = layer(h)
    h.square().sum().backward()
    return [p.grad.clone() for p in layers.parameters()]


def test_the_last_layers_that_fit_keep_their_activations_and_the_gradients_do_not_change() -> None:
    x = torch.randn(2, 24, 32)
    layers = blocks()
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    saved = SavedBytes()
    peak = 5 * GIB
    keep = KeepLayers(layers, 0, allocated=lambda: saved.total, peak=lambda: peak)
    with saved.hooks:
        reference = step(layers, x.clone())
    assert calls == [2] * 4  # checkpointed: every layer runs again in the backward
    # What one block saves in its recomputation: its input, the hidden layer before and after
    # the GELU (2 x 24 x 128 floats each) and the two weight matrices the products save: 88 KB.
    assert keep.layer_cost == (48 * 32 + 2 * 48 * 128 + 2 * 32 * 128) * 4
    keep.target = peak + MARGIN + int(2.5 * keep.layer_cost)
    assert keep.plan() == 2 and keep.kept == [2, 3]
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
    assert keep.plan() == 2  # planned once

    calls[:] = [0] * 4
    with saved.hooks:
        grads = step(layers, x.clone())
    assert calls == [2, 2, 1, 1]  # the kept layers are not recomputed
    for g, r in zip(grads, reference, strict=True):
        assert torch.allclose(g, r, atol=1e-6)

    assert keep.restore() is True
    assert all(layer.gradient_checkpointing for layer in layers)
    assert keep.restore() is False  # nothing left to give back
    calls[:] = [0] * 4
    step(layers, x.clone())
    assert calls == [2] * 4


def test_an_oom_before_the_plan_keeps_measuring() -> None:
    """An out-of-memory error in the first step (nothing kept yet) gives nothing back and leaves
    the measurement in place for the retried step."""
    layers = blocks()
    saved = SavedBytes()
    keep = KeepLayers(layers, 64 * GIB, allocated=lambda: saved.total, peak=lambda: 0)
    assert keep.restore() is False
    with saved.hooks:
        step(layers, torch.randn(2, 16, 32))
    assert keep.layer_cost > 0 and keep.plan() == 4


def test_a_first_step_near_the_target_keeps_no_layer() -> None:
    layers = blocks()
    saved = SavedBytes()
    keep = KeepLayers(layers, 8 * GIB, allocated=lambda: saved.total,
                      peak=lambda: 8 * GIB - MARGIN)
    with saved.hooks:
        step(layers, torch.randn(2, 16, 32))
    assert keep.layer_cost > 0
    assert keep.plan() == 0 and keep.kept == []
    assert all(layer.gradient_checkpointing for layer in layers)


def test_no_layer_is_kept_where_hooks_cannot_see_the_recomputation() -> None:
    """This machine's transformers checkpoints inside a layer's ``forward``, outside its hooks:
    they see one call with gradients, which is not a recomputation, so nothing is measured and
    every layer keeps checkpointing."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).train()
    layers = list(model.get_base_model().model.layers)
    saved = SavedBytes()
    keep = KeepLayers(layers, 64 * GIB, allocated=lambda: saved.total, peak=lambda: 0)
    assert len(keep.layers) == 2
    batch = torch.randint(1, 256, (2, 16))
    with saved.hooks:
        model(input_ids=batch, labels=batch).loss.backward()
    assert saved.total > 0 and keep.layer_cost == 0
    assert keep.plan() == 0
    assert all(layer.gradient_checkpointing for layer in layers)


def test_layers_that_do_not_checkpoint_are_left_out() -> None:
    layers = blocks()
    layers[1].gradient_checkpointing = False
    keep = KeepLayers(layers, 8 * GIB, allocated=lambda: 0, peak=lambda: 0)
    assert keep.layers == [layers[0], layers[2], layers[3]]
