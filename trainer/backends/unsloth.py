"""GPU backend: Unsloth ``FastLanguageModel``, 4-bit QLoRA.

r 16, alpha 32, dropout 0, all seven projections (the spec's defaults), gradient checkpointing
"unsloth" (offloads activations; the memory saving that keeps 8B under 8 GiB), fused AdamW,
lr 2e-4 with a linear schedule and warm-up, padded length-grouped micro-batches (see ``gpu.py``).
Unsloth patches transformers when imported, so it must be imported first: ``select_backend``
imports it when it picks this backend (call it before anything loads a tokenizer). The tokenizer
is tunegate's own from the model folder (the chat template the engines use), not Unsloth's.
Runs only where CUDA and Unsloth are installed (the ``gpu`` extra).
"""

from __future__ import annotations

import os
from typing import Any

from shared.job_spec import TrainSpec
from trainer.backends.base import GpuOptions
from trainer.backends.gpu import Gpu4bitBackend


class UnslothBackend(Gpu4bitBackend):
    name = "unsloth"

    def __init__(self, gpu: GpuOptions | None = None) -> None:
        super().__init__(gpu)
        # "offload" is Unsloth's "unsloth" mode (checkpoints in host memory), "device" its plain
        # checkpointing (kept on the GPU).
        self.checkpointing: str | bool = True if self.gpu.checkpointing == "device" else "unsloth"

    def load_base(self, spec: TrainSpec, tokenizer: Any) -> Any:
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(spec.base_model),
            max_seq_length=spec.max_seq_length,
            load_in_4bit=True,
            dtype=None,  # bf16 where supported
        )
        return model

    def add_lora(self, base: Any, spec: TrainSpec) -> Any:
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            base,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
            bias="none",
            use_gradient_checkpointing=self.checkpointing,
            random_state=spec.seed,
        )

    def before_loop(self, spec: TrainSpec, tokens: int) -> None:
        """Unsloth compiles each decoder layer as one torch.compile region unless
        ``UNSLOTH_BLOCK_COMPILE`` is 0 (read at every forward): ``GpuOptions.compiles`` decides
        for this job. On an H200 at 8B the compiled steps were 1.3-2.5% faster, and the first
        one took 56 s in a fresh process against 8.5 s without (bench/README.md)."""
        super().before_loop(spec, tokens)
        os.environ["UNSLOTH_BLOCK_COMPILE"] = "1" if self.gpu.compiles(tokens) else "0"
