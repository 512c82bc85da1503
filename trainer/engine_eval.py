"""The gate's evaluation through a serving engine: the candidate adapter is loaded into an engine
replica (stock vLLM on a GPU, or the embedded engine) under a name of its own, the golden prompts
go to it as concurrent greedy chat requests (the engine batches them), and the adapter is
unloaded again.

Why an engine rather than generation in the worker: the gate then scores exactly what will be
served (the same kernels, dtype and chat template as the replica that hot-loads the version), and
on a GPU vLLM answers 200 golden prompts in seconds where loading the base model a second time in
the worker (16 GB for an 8B model) and decoding with transformers takes minutes.

The engine must read the trainer's work folder (same host, or a shared volume), and serve the
job's base model: :func:`check_base` compares the engine's base card with the job's base model and
the pipeline falls back to in-process evaluation, with a warning event, when they differ or the
engine refuses the adapter.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from shared.data import Example
from shared.scoring import Scorer
from trainer.evaluate import EvalReport, score_predictions


class EngineEvalError(Exception):
    """The engine cannot evaluate this job (wrong base, adapter refused, unreachable)."""


def _base_card(client: httpx.Client) -> dict[str, Any]:
    cards = client.get("/v1/models").raise_for_status().json().get("data", [])
    for card in cards:
        if not card.get("parent"):
            return dict(card)
    raise EngineEvalError("the engine lists no base model")


def check_base(client: httpx.Client, base_model: str | Path, base_name: str) -> str:
    """The engine's served name of the base model, if it serves ``base_model`` (its path as the
    engine's ``root``, or its name as the served id); else :class:`EngineEvalError`."""
    card = _base_card(client)
    root, served = str(card.get("root") or ""), str(card.get("id") or "")
    same_path = bool(root) and Path(root).resolve() == Path(base_model).resolve()
    if not (same_path or served == base_name or root == base_name):
        raise EngineEvalError(f"the engine serves {served} ({root}), not {base_name}")
    return served


def answer(
    client: httpx.Client,
    model: str,
    golden: list[Example],
    *,
    max_new_tokens: int,
    concurrency: int,
) -> list[str]:
    """Greedy answers of ``model`` (a base or adapter name on the engine), one per golden record
    (its final assistant turn is the reference, not part of the prompt)."""

    def one(example: Example) -> str:
        messages = example.messages
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": messages,
                "max_tokens": max_new_tokens,
                "temperature": 0.0,
                "seed": 0,
            },
        )
        if r.status_code != 200:
            raise EngineEvalError(f"the engine answered {r.status_code}: {r.text[:300]}")
        return str(r.json()["choices"][0]["message"].get("content") or "")

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, golden))


def evaluate_on_engine(
    engine_url: str,
    golden: list[Example],
    *,
    adapter_dir: str | Path | None,
    lora_name: str,
    base_model: str | Path,
    base_name: str,
    scorer: str | Scorer | None = None,
    max_new_tokens: int = 32,
    concurrency: int = 64,
    timeout_s: float = 120.0,
) -> EvalReport:
    """Score the base model (``adapter_dir=None``) or a candidate adapter on ``engine_url``.
    The candidate is loaded as ``lora_name`` and always unloaded afterwards."""
    with httpx.Client(
        base_url=engine_url.rstrip("/"),
        timeout=timeout_s,
        limits=httpx.Limits(max_connections=max(1, concurrency)),
    ) as client:
        try:
            served = check_base(client, base_model, base_name)
        except httpx.HTTPError as exc:
            raise EngineEvalError(f"the engine cannot be reached: {exc}") from exc
        if adapter_dir is None:
            preds = answer(
                client, served, golden, max_new_tokens=max_new_tokens, concurrency=concurrency
            )
            return score_predictions(golden, preds, scorer=scorer)
        r = client.post(
            "/v1/load_lora_adapter", json={"lora_name": lora_name, "lora_path": str(adapter_dir)}
        )
        if r.status_code != 200:
            raise EngineEvalError(
                f"the engine refused the candidate ({r.status_code}): {r.text[:300]}"
            )
        try:
            preds = answer(
                client, lora_name, golden, max_new_tokens=max_new_tokens, concurrency=concurrency
            )
        finally:
            # An engine that went away keeps nothing loaded.
            with contextlib.suppress(httpx.HTTPError):
                client.post("/v1/unload_lora_adapter", json={"lora_name": lora_name})
        return score_predictions(golden, preds, scorer=scorer)


def registered_engine(db: Any, prefer_kind: str = "vllm") -> str | None:
    """A replica the gateway knows (``shared.replicas``): one of ``prefer_kind`` first, the most
    recently seen; ``None`` when none registered."""
    from shared.replicas import ReplicaStore

    records = sorted(ReplicaStore(db).records(), key=lambda r: r.last_seen, reverse=True)
    records.sort(key=lambda r: r.kind != prefer_kind)
    return records[0].url if records else None
