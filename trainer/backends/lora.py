"""What every backend's ``train()`` does, written once: seed, tokenizer, encoded examples, the
base model, LoRA on it, the optimizer, the shared loop (``trainer.backends.loop``), the adapter
saved atomically with its manifest, and the report.

A backend subclasses :class:`LoraBackend` and says only what differs: how the base model is
loaded and LoRA added to it, where it runs, its optimizer, the loop's options (how a micro-batch's
loss is summed, what to do on OOM or after a step) and what its manifest adds.
"""

from __future__ import annotations

import abc
import gc
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.chat import Tokenized, tokenize_many
from shared.data import Message
from shared.job_spec import TrainSpec
from trainer.backends.base import Hooks, TrainResult, adapter_manifest, save_adapter_atomically
from trainer.backends.loop import run_loop


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer of the model folder (the chat template the engines use), with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_all(
    tokenizer: Any, examples: list[list[Message]], max_seq_length: int
) -> list[Tokenized]:
    encoded = tokenize_many(tokenizer, examples, max_seq_length=max_seq_length)
    return [t for t in encoded if t.n_supervised > 0]


def planned_tokens(encoded: list[Tokenized], spec: TrainSpec) -> int:
    """About how many input tokens the loop will train on: every epoch, or ``max_steps``
    batches of examples of the mean length."""
    planned = len(encoded) * spec.n_epochs  # examples the loop will see
    if spec.max_steps:
        planned = min(planned, spec.max_steps * spec.batch_size)
    return sum(len(t.input_ids) for t in encoded) * planned // max(1, len(encoded))


def lora_config(spec: TrainSpec) -> Any:
    """peft's ``LoraConfig`` from the spec (the backends that add LoRA through peft)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )


class LoraBackend(abc.ABC):
    """A :class:`trainer.backends.base.TrainingBackend` whose ``train()`` is the steps above."""

    name: str

    @abc.abstractmethod
    def load_base(self, spec: TrainSpec, tokenizer: Any) -> Any:
        """The base model, ready for LoRA."""

    @abc.abstractmethod
    def add_lora(self, base: Any, spec: TrainSpec) -> Any:
        """The trainable model: ``base`` with LoRA adapters on ``spec.lora.target_modules``."""

    @abc.abstractmethod
    def where(self) -> str:
        """The device it trains on, for the job's events."""

    @abc.abstractmethod
    def optimizer(self, params: list[Any], spec: TrainSpec) -> Any:
        """The optimizer over the trainable parameters."""

    @abc.abstractmethod
    def loop_options(self, tokenizer: Any, model: Any) -> dict[str, Any]:
        """``run_loop``'s backend options for ``model``: ``forward_sum``, and
        ``on_oom``/``after_step``."""

    def after_loop(self, model: Any) -> None:
        """Called once the loop has ended, before the adapter is saved (nothing by default)."""
        return None

    def before_loop(self, spec: TrainSpec, tokens: int) -> None:
        """Called once the optimizer exists, just before the first step, with the input tokens
        the job will train on (nothing by default)."""
        return None

    def manifest_extra(self) -> dict[str, Any]:
        """Fields the adapter's manifest records besides the common ones."""
        return {}

    def train(
        self, spec: TrainSpec, examples: list[list[Message]], out_dir: Path, hooks: Hooks
    ) -> TrainResult:
        """Train a LoRA adapter on ``examples`` and save it atomically at ``out_dir``."""
        import torch

        t0 = time.monotonic()
        torch.manual_seed(spec.seed)
        tokenizer = load_tokenizer(spec.base_model)
        # The objects alive now (the imported libraries: millions of them with torch, Unsloth,
        # triton and sympy) are left out of garbage collections until training ends: Unsloth
        # calls gc.collect() many times while it loads, and those full collections took 5.2 s
        # of an 8B job's load and first step on the H200 (bench/README.md).
        gc.freeze()
        try:
            return self._train(spec, examples, out_dir, hooks, tokenizer, t0)
        finally:
            gc.unfreeze()

    def _train(
        self, spec: TrainSpec, examples: list[list[Message]], out_dir: Path, hooks: Hooks,
        tokenizer: Any, t0: float,
    ) -> TrainResult:
        # The examples are encoded while the model loads (5,000 seed examples take seconds).
        with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
            encoding = pool.submit(encode_all, tokenizer, examples, spec.max_seq_length)
            base = self.load_base(spec, tokenizer)
            hooks.check_cancelled()
            model = self.add_lora(base, spec)
            encoded = encoding.result()
        params = [p for p in model.parameters() if p.requires_grad]
        hooks.on_event(
            f"{self.name}: model loaded, {len(encoded)} examples on {self.where()}",
            {"trainable_params": sum(p.numel() for p in params), "examples": len(encoded),
             "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params})},
        )
        optimizer = self.optimizer(params, spec)
        options = self.loop_options(tokenizer, model)
        try:
            self.before_loop(spec, planned_tokens(encoded, spec))
            result = run_loop(
                model=model, optimizer=optimizer, encoded=encoded, batch_size=spec.batch_size,
                micro_batch_size=spec.micro_batch_size, n_epochs=spec.n_epochs,
                max_steps=spec.max_steps, warmup_ratio=spec.warmup_ratio, seed=spec.seed,
                hooks=hooks, **options,
            )
        finally:
            self.after_loop(model)
        hooks.check_cancelled()
        manifest = adapter_manifest(spec, backend=self.name, steps=result.steps,
                                    extra=self.manifest_extra())
        save_adapter_atomically(model, out_dir, manifest)
        return TrainResult(
            backend=self.name, steps=result.steps, train_s=time.monotonic() - t0,
            tokens=result.tokens, final_loss=result.losses[-1] if result.losses else float("nan"),
            micro_batch_size=result.micro_batch_size, grad_accum=result.grad_accum,
            adapter_dir=out_dir, losses=result.losses,
        )
