"""The evaluation gate: score a base model (optionally with an adapter) on a golden set with
greedy decoding, then decide whether the adapter may be registered.

Decoding is batched with left padding through transformers + peft, in float32 (on the GPU
machine the same code runs on CUDA when asked to). Golden records use the training shapes; the
last assistant message is the reference answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.chat import prompt_text
from shared.data import Example
from shared.scoring import Scorer, get_scorer, score_all


@dataclass
class EvalReport:
    score: float  # mean scorer value in [0, 1]
    n: int
    scorer: str
    samples: list[dict[str, Any]] = field(default_factory=list)  # the first few, for reports
    engine: str | None = None  # the engine replica that answered; None: the worker itself
    seconds: float | None = None  # wall-clock seconds of generation and scoring

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "n": self.n, "scorer": self.scorer, "samples": self.samples,
                "engine": self.engine, "seconds": self.seconds}


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    score: float
    threshold: float
    stable_score: float | None
    tolerance: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gate(
    score: float, *, threshold: float = 0.95, stable_score: float | None = None,
    tolerance: float = 0.01,
) -> GateDecision:
    """Pass when ``score >= threshold`` and ``score >= stable_score - tolerance`` (scores and
    tolerance on the 0..1 scale: a tolerance of 0.01 is one point)."""
    eps = 1e-9  # scores are ratios of small integers; do not fail 0.95 >= 0.95 on rounding
    if score + eps < threshold:
        reason = f"score {score:.3f} is below the threshold {threshold:.3f}"
        passed = False
    elif stable_score is not None and score + eps < stable_score - tolerance:
        reason = (
            f"score {score:.3f} regresses more than {tolerance:.3f} "
            f"below the current stable's {stable_score:.3f}"
        )
        passed = False
    else:
        reason = f"score {score:.3f} passes (threshold {threshold:.3f})"
        passed = True
    return GateDecision(passed, score, threshold, stable_score, tolerance, reason)


def load_model(
    base_model: str | Path, adapter_dir: str | Path | None = None, device: str = "cpu"
) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_model))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32).to(device)  # type: ignore[arg-type]
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
    model.eval()
    return model, tok


def generate(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
    batch_size: int = 16, max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers, one per conversation (its final assistant turn, if any, is dropped)."""
    import torch

    device = next(model.parameters()).device
    prompts = [prompt_text(tokenizer, c) for c in conversations]
    # Longest first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        with torch.inference_mode():
            gen = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
            )
        for row, i in enumerate(idx):
            new = gen[row, enc["input_ids"].shape[1]:]
            out[i] = tokenizer.decode(new, skip_special_tokens=True)
    return out


def evaluate(
    model: Any, tokenizer: Any, golden: list[Example], *, scorer: str | Scorer | None = None,
    batch_size: int = 16, max_new_tokens: int = 32, keep_samples: int = 5,
) -> EvalReport:
    preds = generate(model, tokenizer, [e.messages for e in golden],
                     batch_size=batch_size, max_new_tokens=max_new_tokens)
    return score_predictions(golden, preds, scorer=scorer, keep_samples=keep_samples)


def score_predictions(
    golden: list[Example], preds: list[str], *, scorer: str | Scorer | None = None,
    keep_samples: int = 5,
) -> EvalReport:
    """Score answers (one per golden record, however they were generated) against the records'
    last assistant messages."""
    fn = scorer if callable(scorer) else get_scorer(scorer)
    name = scorer if isinstance(scorer, str) else getattr(fn, "__name__", type(fn).__name__)
    refs = [e.messages[-1]["content"] for e in golden]
    report = score_all(preds, refs, fn)
    samples = [
        {"line": e.line, "prediction": p, "reference": r, "score": s}
        for e, p, r, s in zip(golden, preds, refs, report.per_item, strict=True)
    ][:keep_samples]
    return EvalReport(report.score, report.n, str(name or "exact"), samples)
