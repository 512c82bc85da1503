"""The job spec: everything a training job needs, as one pydantic model sent through arq."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# All seven projections of a Llama-class block: attention and MLP.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ``"auto"`` epochs, as OpenAI chooses them: about 3 epochs, but at least ~100 and at most
# ~25,000 examples trained on in all (small sets get more epochs, large ones fewer).
AUTO_TARGET_EPOCHS = 3
AUTO_MIN_EXAMPLES = 100  # examples seen over the whole run, at least
AUTO_MAX_EXAMPLES = 25_000  # and at most
AUTO_MAX_EPOCHS = 25


def auto_epochs(n_examples: int) -> int:
    """Epochs for ``"auto"``: 3, raised to reach ``AUTO_MIN_EXAMPLES`` examples trained on
    (at most ``AUTO_MAX_EPOCHS``), lowered to stay under ``AUTO_MAX_EXAMPLES`` (at least 1)."""
    n = max(1, n_examples)
    if n * AUTO_TARGET_EPOCHS < AUTO_MIN_EXAMPLES:
        return min(AUTO_MAX_EPOCHS, -(-AUTO_MIN_EXAMPLES // n))
    if n * AUTO_TARGET_EPOCHS > AUTO_MAX_EXAMPLES:
        return max(1, AUTO_MAX_EXAMPLES // n)
    return AUTO_TARGET_EPOCHS


class LoraSpec(BaseModel):
    r: int = Field(default=16, ge=1, le=256)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))


class TrainSpec(BaseModel):
    job_id: str
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the adapter's name
    base_model: str  # a local model directory
    base_model_name: str | None = None  # the served name of the base (defaults to the dir name)
    training_file: str  # paths of JSONL files
    validation_file: str | None = None
    golden_file: str | None = None
    seed: int = 0
    n_epochs: int = Field(default=1, ge=1, le=50)
    auto_epochs: bool = False  # choose n_epochs from the training set's size (auto_epochs())
    batch_size: int = Field(default=8, ge=1, le=1024)  # examples per optimizer step
    micro_batch_size: int | None = Field(default=None, ge=1)  # None: the whole batch in one pass
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = 0.0
    max_steps: int | None = Field(default=None, ge=1)  # stop early (tests, smoke runs)
    lora: LoraSpec = Field(default_factory=LoraSpec)  # type: ignore[arg-type]
    max_seq_length: int = Field(default=512, ge=16)
    max_output_chars: int = 512
    max_invalid_fraction: float = Field(default=0.02, ge=0, le=1)
    backend: Literal["auto", "cpu", "unsloth", "hf_qlora"] = "auto"
    # Evaluation gate
    scorer: str | None = None  # see shared.scoring.get_scorer; None = exact match
    threshold: float = Field(default=0.95, ge=0, le=1)
    tolerance: float = Field(default=0.01, ge=0, le=1)  # one point, on the 0..1 score scale
    golden_limit: int | None = Field(default=None, ge=1)  # score only the first N golden records
    eval_batch_size: int = Field(default=16, ge=1)
    eval_max_new_tokens: int = Field(default=32, ge=1, le=1024)
    evaluate_base: bool = False  # also score the untuned base (for before/after reports)
    metadata: dict[str, str] = Field(default_factory=dict)
    # W3C traceparent of the API request that created the job: the worker's job span continues
    # that trace (None when tracing is off).
    traceparent: str | None = Field(default=None, max_length=55)

    @property
    def effective_base_name(self) -> str:
        from pathlib import Path

        return self.base_model_name or Path(self.base_model).name
