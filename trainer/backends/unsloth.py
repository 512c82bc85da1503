"""GPU backend: Unsloth ``FastLanguageModel``, 4-bit QLoRA.

r 16, alpha 32, dropout 0, all seven projections (the spec's defaults), gradient checkpointing
"unsloth" (offloads activations; the memory saving that keeps 8B under 8 GiB), 8-bit AdamW,
lr 2e-4 with a linear schedule and warm-up, padded length-grouped micro-batches (see ``gpu.py``).
Unsloth patches transformers when imported, so it must be imported first: ``select_backend``
imports it when it picks this backend (call it before anything loads a tokenizer).
Runs only where CUDA and Unsloth are installed (the ``gpu`` extra).
"""

from __future__ import annotations

import time
from pathlib import Path

from shared.data import Message
from shared.job_spec import TrainSpec
from trainer.backends.base import Hooks, TrainResult


class UnslothBackend:
    name = "unsloth"

    def train(
        self, spec: TrainSpec, examples: list[list[Message]], out_dir: Path, hooks: Hooks
    ) -> TrainResult:
        t0 = time.monotonic()
        # Unsloth patches transformers when imported; import it before building the model.
        from unsloth import FastLanguageModel

        from trainer.backends.cpu import load_tokenizer
        from trainer.backends.gpu import train_4bit

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(spec.base_model),
            max_seq_length=spec.max_seq_length,
            load_in_4bit=True,
            dtype=None,  # bf16 where supported
        )
        hooks.check_cancelled()
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=spec.seed,
        )
        # Our tokenizer from the model folder: the same chat template the engines use.
        tokenizer = load_tokenizer(spec.base_model)
        return train_4bit(self.name, model, tokenizer, spec, examples, out_dir, hooks, t0)
