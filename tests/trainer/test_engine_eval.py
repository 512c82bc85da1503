"""The gate's evaluation through a serving engine (trainer.engine_eval), on CPU: a real embedded
engine process on the real SmolLM2 stands where vLLM stands on a GPU (same HTTP protocol). The
candidate is loaded under its own name, scored with batched requests, and unloaded; its score
matches the worker's own (transformers) evaluation of the same adapter; an engine serving another
base, or one that cannot be reached, is refused, and the pipeline then evaluates in the worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.data import validate_file, write_jsonl
from shared.db import Database
from shared.job_records import JobStore
from shared.job_spec import TrainSpec
from tests.procs import free_port, run_server
from tests.protocol_checks import make_adapter
from trainer.data_sources import build_splits
from trainer.engine_eval import EngineEvalError, evaluate_on_engine
from trainer.evaluate import evaluate, load_model
from trainer.jobs import JobHooks, evaluate_golden

N_GOLDEN = 12
MAX_NEW = 4
SCORER = "label_set:fresh,rotten"


@pytest.fixture(scope="module")
def engine(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("eval-engine") / "engine.log"
    args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded", "--model",
            str(default_model_dir), "--port", str(port), "--max-loras", "2",
            "--max-lora-rank", "16", "--max-model-len", "1024", "--max-num-seqs", "8"]
    with run_server(args, port=port, log=log, timeout_s=240) as (base, _proc):
        yield base


@pytest.fixture(scope="module")
def data(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval-data")
    _, golden = build_splits(n_train=2, n_golden=N_GOLDEN, seed=0)
    path = write_jsonl(root / "golden.jsonl", golden)
    adapter = make_adapter(default_model_dir, root / "adapter", rank=8, seed=5,
                           targets=["q_proj", "v_proj"], std=0.05)
    return {"root": root, "golden": validate_file(path).examples, "adapter": adapter}


def loaded(engine: str) -> set[str]:
    return {c["id"] for c in httpx.get(f"{engine}/v1/models").json()["data"] if c.get("parent")}


def test_candidate_on_the_engine_scores_as_the_worker_does(
    engine: str, data: dict[str, Any], default_model_dir: Path
) -> None:
    report = evaluate_on_engine(
        engine, data["golden"], adapter_dir=data["adapter"], lora_name="rt-candidate-1",
        base_model=default_model_dir, base_name="whatever-the-job-calls-it",
        scorer=SCORER, max_new_tokens=MAX_NEW, concurrency=8)
    assert report.n == N_GOLDEN
    assert "rt-candidate-1" not in loaded(engine)  # unloaded after scoring
    model, tok = load_model(default_model_dir, data["adapter"])
    local = evaluate(model, tok, data["golden"], scorer=SCORER, max_new_tokens=MAX_NEW)
    print(f"engine {report.score:.3f}, worker {local.score:.3f}")
    # Both greedy in float32; batching may flip a near-tie, one prompt at most.
    assert abs(report.score - local.score) <= 1 / N_GOLDEN + 1e-9
    base = evaluate_on_engine(
        engine, data["golden"], adapter_dir=None, lora_name="unused",
        base_model=default_model_dir, base_name="x", scorer=SCORER, max_new_tokens=MAX_NEW)
    assert base.n == N_GOLDEN and 0.0 <= base.score <= 1.0


def test_engine_of_another_base_or_a_bad_adapter_is_refused(
    engine: str, data: dict[str, Any]
) -> None:
    with pytest.raises(EngineEvalError, match="not Llama-3.1-8B"):
        evaluate_on_engine(engine, data["golden"], adapter_dir=data["adapter"], lora_name="c2",
                           base_model="/models/Llama-3.1-8B", base_name="Llama-3.1-8B")
    with pytest.raises(EngineEvalError, match="refused the candidate"):
        evaluate_on_engine(engine, data["golden"], adapter_dir=data["root"] / "no-such-adapter",
                           lora_name="c3", base_model=data["adapter"].parent / "x",
                           base_name=Path(str(loaded_base(engine))).name)
    assert not {"c2", "c3"} & loaded(engine)


def loaded_base(engine: str) -> str:
    cards = httpx.get(f"{engine}/v1/models").json()["data"]
    return str(next(c["id"] for c in cards if not c.get("parent")))


def test_unreachable_engine_falls_back_to_the_worker(
    data: dict[str, Any], default_model_dir: Path
) -> None:
    store = JobStore(Database(f"sqlite:///{data['root'] / 'db.sqlite'}"))
    spec = TrainSpec(job_id="ftjob-evalfallback", name="rt", base_model=str(default_model_dir),
                     training_file="-", scorer=SCORER, eval_max_new_tokens=MAX_NEW,
                     backend="cpu")
    store.create(spec.job_id, model="m", name="rt", spec={})
    hooks = JobHooks(store, spec.job_id, threading.Event())
    dead = f"http://127.0.0.1:{free_port()}"
    report = evaluate_golden(spec, data["adapter"], data["golden"], dead, hooks)
    assert report.n == N_GOLDEN and report.engine is None and report.seconds is not None
    warns = [e for e in store.events(spec.job_id) if e["level"] == "warn"]
    assert warns and "cannot be reached" in warns[0]["message"]


def test_registered_engine_prefers_a_vllm_replica(tmp_path: Path) -> None:
    from shared.replicas import ReplicaStore
    from trainer.engine_eval import registered_engine

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")  # migrated to head on open
    assert registered_engine(db) is None
    replicas = ReplicaStore(db)
    replicas.register("http://127.0.0.1:9001", kind="embedded")
    assert registered_engine(db) == "http://127.0.0.1:9001"
    replicas.register("http://127.0.0.1:9002", kind="vllm")
    replicas.register("http://127.0.0.1:9003", kind="embedded")  # newer, but not vLLM
    assert registered_engine(db) == "http://127.0.0.1:9002"
