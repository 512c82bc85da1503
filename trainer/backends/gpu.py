"""What the two GPU backends share: padded, length-grouped micro-batches, the optimizer, CUDA
seeds, OOM recovery and the peak memory in the manifest, around a 4-bit model.

Micro-batches are right-padded rows of examples of similar length (``loop.length_grouped_batches``
groups them, so little padding is wasted), with an ``attention_mask`` that hides the padding and
labels only on the answer tokens. Every example is its own row: no example ever attends to another
(plain SDPA, without flash-attention's varlen kernels, cannot keep packed examples apart, and a
4,096-token packed row costs 8x the attention FLOPs of eight 512-token rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.chat import Tokenized
from shared.job_spec import TrainSpec
from trainer.backends.base import GpuOptions
from trainer.backends.embeddings import HostEmbeddings
from trainer.backends.keep_layers import KeepLayers
from trainer.backends.loop import ForwardSum, pad_batch
from trainer.backends.lora import LoraBackend
from trainer.backends.supervised import plain_output_layer, supervised_loss_sum, unwrap


def padded_forward_sum(pad_id: int, embeddings: HostEmbeddings | None = None) -> ForwardSum:
    """``forward_sum`` through the model's own loss (Unsloth's fused cross-entropy over every
    position), for models whose logits are transformed after the output layer. That loss is a
    mean over the supervised positions, so it is scaled back to a sum; the loop divides by the
    whole step's count. ``embeddings``: the input embeddings gathered on the host."""

    def forward_sum(model: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
        device = unwrap(model).get_output_embeddings().weight.device
        batch = pad_batch(items, pad_id, device, embeddings)
        # The model shifts labels by one (position t predicts token t+1); a row's first token is
        # never an answer token, so the host's count is the model's, without a device sync.
        n = sum(t.n_supervised for t in items)
        out = model(**batch)
        return out.loss * n, n

    return forward_sum


def answer_forward_sum(
    pad_id: int, fallback: ForwardSum, embeddings: HostEmbeddings | None = None
) -> ForwardSum:
    """``forward_sum`` with the output layer only at the answer tokens
    (``trainer.backends.supervised``); ``fallback`` for models whose logits are transformed
    after the output layer."""

    def forward_sum(model: Any, items: Sequence[Tokenized]) -> tuple[Any, int]:
        inner = unwrap(model)
        if not plain_output_layer(inner.config):
            return fallback(model, items)
        # Unsloth's decoder reads this flag (set by its causal-LM forward, which this path does
        # not call) to treat a batch as unlabelled; a gate evaluation in the same worker leaves
        # it set. These batches are labelled.
        inner.get_decoder()._has_no_labels = False
        return supervised_loss_sum(model, items, pad_id, embeddings)

    return forward_sum


class Gpu4bitBackend(LoraBackend):
    """A 4-bit QLoRA backend on one CUDA device; subclasses load the model and add LoRA.

    ``answer_logits_only`` (the default) applies the output layer at the answer tokens only;
    False keeps the model's own loss over every position (benchmarks compare the two)."""

    answer_logits_only = True

    def __init__(self, gpu: GpuOptions | None = None) -> None:
        self.gpu = gpu or GpuOptions()
        self.host_embeddings: HostEmbeddings | None = None  # while a loop runs, if so chosen
        self.keep: KeepLayers | None = None  # while a loop runs under a memory target
        self.kept_layers: int | None = None  # how many kept their activations (None: no target)

    def where(self) -> str:
        import torch

        return str(torch.cuda.get_device_name(0))

    def optimizer(self, params: list[Any], spec: TrainSpec) -> Any:
        """``TrainerSettings.optimizer``: torch's fused AdamW (every tensor in one kernel
        launch), or bitsandbytes' 8-bit AdamW (a quarter of the state memory, a launch per
        tensor)."""
        import torch

        if self.gpu.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=spec.learning_rate,
                                       weight_decay=spec.weight_decay)
        # The fused kernel takes float32, bf16 and fp16 parameters alike; the LoRA weights are
        # float32 (peft and Unsloth keep adapters in float32 over a 4-bit base).
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                 fused=True)

    def before_loop(self, spec: TrainSpec, tokens: int) -> None:
        import torch

        torch.manual_seed(spec.seed)
        torch.cuda.manual_seed_all(spec.seed)
        torch.cuda.reset_peak_memory_stats()

    def loop_options(self, tokenizer: Any, model: Any) -> dict[str, Any]:
        import torch

        self.host_embeddings = None
        if self.gpu.input_embeddings == "host" and HostEmbeddings.applies(model):
            self.host_embeddings = HostEmbeddings(model)
            torch.cuda.empty_cache()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        whole = padded_forward_sum(pad_id, self.host_embeddings)
        forward = (answer_forward_sum(pad_id, whole, self.host_embeddings)
                   if self.answer_logits_only else whole)
        self.keep = KeepLayers.for_model(model, self.gpu.memory_target_gib)
        self.kept_layers = 0 if self.keep is not None else None
        return {"forward_sum": forward, "on_oom": self.on_oom, "after_step": self.after_step,
                "costliest_first": True}

    def after_step(self, step: int) -> None:
        """Once the first (costliest) step is reported: the layers that fit under the memory
        target keep their activations (``trainer.backends.keep_layers``)."""
        if step == 1 and self.keep is not None:
            self.kept_layers = self.keep.plan()

    def on_oom(self) -> str | None:
        """Out of memory: layers that kept their activations checkpoint again (then the loop
        retries the step as it was; the next time it halves the micro-batch)."""
        import torch

        freed = None
        if self.keep is not None and self.keep.restore():
            freed = f"the {self.kept_layers} layers that kept their activations checkpoint again"
            self.kept_layers = 0
        torch.cuda.empty_cache()
        return freed

    def after_loop(self, model: Any) -> None:
        if self.keep is not None:
            self.keep.restore()
            self.keep.remove_hooks()  # a loop of one step never planned
            self.keep = None
        if self.host_embeddings is not None:
            self.host_embeddings.restore()
            self.host_embeddings = None

    def manifest_extra(self) -> dict[str, Any]:
        import torch

        extra: dict[str, Any] = {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if self.kept_layers is not None:
            extra["kept_layers"] = self.kept_layers
        return extra
