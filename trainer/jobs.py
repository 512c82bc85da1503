"""The job pipeline: validate -> train -> evaluate -> gate -> register.

:func:`run_job` is synchronous (the worker runs it in a thread) and writes the job's record and
events as it goes. Cancellation is a ``threading.Event`` checked at every training step and
between phases. Nothing reaches the registry unless the gate passes: the adapter is trained into
the job's private work folder, copied to ``staging/<job id>`` in the artifact store, and only then
``Registry.register_version`` moves it under ``adapters/`` (manifest last) and ``stable`` moves.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.artifact_store import ArtifactStore
from shared.data import DatasetRejected, ValidationReport, validate_file
from shared.errors import ModelNotFound, NotFound
from shared.job_records import JobStore, worker_lost_error
from shared.job_spec import TrainSpec, auto_epochs
from trainer.backends import GpuOptions, select_backend
from trainer.backends.base import JobCancelled
from trainer.cost import CostMeter, cost_message
from trainer.evaluate import EvalReport, GateDecision, evaluate, gate, load_model
from trainer.job_files import ResultFile, fetch_inputs
from trainer.progress import JobHooks
from trainer.tracing import JobTrace, note, phase

HEARTBEAT_S = 15.0  # seconds between a running job's heartbeats


class CancelFlag(threading.Event):
    """Set to stop the job at its next step; ``reason`` says why (``cancelled`` or ``timeout``)."""

    reason: str = "cancelled"


class AdapterRegistry(Protocol):
    """What the pipeline needs of ``shared.registry.Registry``."""

    store: ArtifactStore

    def register_version(self, name: str, src: str, manifest: dict[str, Any]) -> Any: ...
    def set_alias(self, name: str, alias: str, version: int, reason: str | None = None) -> None: ...
    def resolve(self, model: str) -> Any: ...
    def get_version(self, name: str, version: int) -> Any: ...
    def materialize(self, model: str, cache_dir: str | Path) -> Path: ...


@dataclass
class JobOutcome:
    status: str  # succeeded | failed | cancelled
    fine_tuned_model: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    message: str = ""  # appended to the last event's "Job succeeded"
    next_steps: dict[str, Any] | None = None  # how the version reaches users (hand_over)


def _count_tokens_fn(base_model: str) -> Any:
    from shared.chat import count_tokens_many
    from trainer.backends.lora import load_tokenizer

    tok = load_tokenizer(base_model)
    return lambda records: count_tokens_many(tok, records)


def validate_training(spec: TrainSpec, path: str, count: Any) -> ValidationReport:
    return validate_file(
        path, max_output_chars=spec.max_output_chars,
        max_invalid_fraction=spec.max_invalid_fraction,
        count_tokens=count, max_seq_length=spec.max_seq_length,
    )


def stable_score(registry: AdapterRegistry, spec: TrainSpec, golden_sha: str, golden: list[Any],
                 scorer: str | None, work_dir: Path) -> tuple[float | None, str | None]:
    """The current ``stable`` version's score on this golden set: the recorded one when its
    manifest was scored on the same golden file and scorer, else measured now."""
    try:
        resolved = registry.resolve(f"{spec.name}:stable")
    except (ModelNotFound, NotFound):
        return None, None
    info = registry.get_version(spec.name, resolved.version)
    metrics = (info.manifest or {}).get("metrics", {})
    if metrics.get("golden_sha256") == golden_sha and metrics.get("scorer") == (scorer or "exact"):
        return float(metrics["golden_score"]), info.ref
    path = resolved.path
    if not registry.store.is_local:  # a remote store (S3, ...): download the version once
        path = str(registry.materialize(resolved.ref, work_dir / "stable-adapter"))
    model, tok = load_model(spec.base_model, path)
    report = evaluate(model, tok, golden, scorer=scorer, batch_size=spec.eval_batch_size,
                      max_new_tokens=spec.eval_max_new_tokens)
    return report.score, info.ref


def evaluate_golden(spec: TrainSpec, adapter_dir: Path | None, golden: list[Any],
                    eval_engine: str | None, hooks: JobHooks) -> EvalReport:
    """Score the base model (``adapter_dir=None``) or the candidate on the golden set: on the
    engine at ``eval_engine`` when given (``trainer.engine_eval``: the candidate loaded there,
    batched requests), else in this process; an engine that cannot do it falls back to this
    process, with a warning event."""
    t0 = time.monotonic()
    if eval_engine:
        from trainer.engine_eval import EngineEvalError, evaluate_on_engine

        try:
            report = evaluate_on_engine(
                eval_engine, golden, adapter_dir=adapter_dir,
                lora_name=f"{spec.name}-candidate-{spec.job_id.removeprefix('ftjob-')[:12]}",
                base_model=spec.base_model, base_name=spec.effective_base_name,
                scorer=spec.scorer, max_new_tokens=spec.eval_max_new_tokens)
            report.engine, report.seconds = eval_engine, round(time.monotonic() - t0, 2)
            return report
        except EngineEvalError as exc:
            hooks.store.add_event(spec.job_id, f"Evaluating in the worker: {exc}", level="warn",
                                  data={"engine": eval_engine})
    from trainer.backends import cuda_available

    device = "cuda" if spec.backend != "cpu" and cuda_available() else "cpu"
    model, tok = load_model(spec.base_model, adapter_dir, device=device)
    report = evaluate(model, tok, golden, scorer=spec.scorer, batch_size=spec.eval_batch_size,
                      max_new_tokens=spec.eval_max_new_tokens)
    report.seconds = round(time.monotonic() - t0, 2)
    return report


def resolve_auto(spec: TrainSpec, n_examples: int, store: JobStore) -> TrainSpec:
    """Settle ``"auto"`` hyperparameters now that the training set's size is known, record the
    choice on the job (its ``hyperparameters``) and in an event."""
    import math

    chosen: dict[str, Any] = {}
    if spec.auto_epochs:
        chosen["n_epochs"] = auto_epochs(n_examples)
        spec = spec.model_copy(update={"n_epochs": chosen["n_epochs"], "auto_epochs": False})
    steps = math.ceil(n_examples / spec.batch_size) * spec.n_epochs
    if spec.max_steps:
        steps = min(steps, spec.max_steps)
    if chosen:
        store.update_spec(spec.job_id, **chosen, auto_chosen=sorted(chosen), total_steps=steps)
        store.add_event(spec.job_id, f"auto hyperparameters: n_epochs={spec.n_epochs} for "
                        f"{n_examples} examples (batch size {spec.batch_size}: {steps} steps)",
                        data={**chosen, "examples": n_examples, "total_steps": steps})
    else:
        store.update_spec(spec.job_id, total_steps=steps)
    return spec


def run_job(spec: TrainSpec, *, store: JobStore, registry: AdapterRegistry | None, work_dir: Path,
            cancel: threading.Event, progress_interval_s: float = 2.0,
            files_dir: Path | None = None, price_per_device_hour: float = 0.0,
            eval_engine: str | None = None, trace: JobTrace | None = None,
            metrics: Any = None, gpu: GpuOptions | None = None) -> JobOutcome:
    """``files_dir``: where the per-step CSV goes (``result_files``); ``trace``: spans for the
    phases (trainer.tracing); ``metrics``: the worker's gauges; ``gpu``: the settings a GPU
    backend trains with."""
    job_id = spec.job_id
    artifacts = registry.store if registry is not None else None
    meter = CostMeter(price_per_device_hour)  # device seconds by phase (trainer.cost)
    results: ResultFile | None = None
    result: dict[str, Any] = {}

    beating = threading.Event()

    def beat() -> None:
        # Heartbeats independent of the phase (model loading, evaluation emit no progress): a
        # job whose heartbeat stops lost its worker (see ``JobStore.fail_stale``).
        while not beating.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                store.heartbeat(job_id)

    def finish(outcome: JobOutcome) -> JobOutcome:
        beating.set()
        meter.stop()
        if results is not None:
            with contextlib.suppress(OSError):  # the store may be down: keep the outcome
                results.close(store)
        trained = outcome.result.get("train", {}).get("tokens")
        if trained is None and hooks.last_step is not None:
            trained = hooks.last_step.tokens  # cancelled or failed mid-training
        outcome.result["cost"] = cost = meter.report(trained)
        # A message event, not "metrics": those carry one training step each (OpenAI's shape).
        store.add_event(job_id, cost_message(cost), data={"cost": cost}, heartbeat=False)
        store.set_status(job_id, outcome.status, fine_tuned_model=outcome.fine_tuned_model,
                         result=outcome.result, error=outcome.error, trained_tokens=trained,
                         estimated_finish=None)
        store.add_event(job_id, f"Job {outcome.status}" + (
            f": {outcome.error['message']}" if outcome.error else outcome.message),
            level="error" if outcome.status == "failed" else "info", heartbeat=False,
            data=outcome.next_steps)
        shutil.rmtree(work_dir, ignore_errors=True)
        return outcome

    if not store.set_status(job_id, "running", only_from=frozenset({"validating_files", "queued"})):
        current = store.get(job_id)
        return JobOutcome(current["status"] if current else "failed")  # cancelled meanwhile
    threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True).start()
    if files_dir is not None:
        results = ResultFile.open(store, job_id, files_dir, artifacts)
    hooks = JobHooks(store, job_id, cancel, progress_interval_s,
                     results_path=results.path if results else None, metrics=metrics)
    try:
        meter.enter("validate")
        with phase(trace, "validate") as sp:
            # Before any tokenizer loads: the Unsloth backend must be imported before transformers.
            backend = select_backend(spec.backend, gpu)
            count = _count_tokens_fn(spec.base_model)
            spec = fetch_inputs(spec, artifacts, work_dir)
            report = validate_training(spec, spec.training_file, count)
            result["validation"] = report.to_dict()
            store.add_event(job_id, f"Validated training file: {len(report.examples)} of "
                            f"{report.total} lines valid", data=result["validation"])
            report.raise_if_rejected()
            if spec.validation_file:
                val = validate_training(spec, spec.validation_file, count)
                result["validation_file"] = val.to_dict()
                val.raise_if_rejected()
            golden_report = None
            if spec.golden_file:
                golden_report = validate_training(spec, spec.golden_file, count)
                golden_report.raise_if_rejected()
            hooks.check_cancelled()
            note(sp, **{"validation.valid": len(report.examples),
                        "validation.total": report.total})

        golden = golden_report.examples[: spec.golden_limit] if golden_report else []
        if golden and spec.evaluate_base:
            meter.enter("evaluate")
            base = evaluate_golden(spec, None, golden, eval_engine, hooks)
            result["base_eval"] = base.to_dict()
            store.add_event(job_id, f"Base model golden score {base.score:.3f}",
                            data=base.to_dict())
            hooks.check_cancelled()

        spec = resolve_auto(spec, len(report.examples), store)
        store.add_event(job_id, f"Training with the {backend.name} backend",
                        data={"backend": backend.name})
        adapter_dir = work_dir / "adapter"
        meter.enter("train")
        with phase(trace, "train", backend=backend.name) as sp:
            trained = backend.train(spec, [e.messages for e in report.examples], adapter_dir,
                                    hooks)
            note(sp, **{"train.steps": trained.steps, "train.tokens": trained.tokens,
                        "train.final_loss": trained.final_loss})
        result["train"] = trained.to_dict()
        store.add_event(job_id, f"Trained {trained.steps} steps in {trained.train_s:.1f} s",
                        data=result["train"])
        hooks.check_cancelled()

        decision: GateDecision | None = None
        eval_report: EvalReport | None = None
        if golden:
            meter.enter("evaluate")
            with phase(trace, "evaluate", n=len(golden)) as sp:
                eval_report = evaluate_golden(spec, adapter_dir, golden, eval_engine, hooks)
                note(sp, **{"eval.score": eval_report.score})
            if metrics is not None:
                metrics.eval_score.labels(spec.name).set(eval_report.score)
            result["eval"] = eval_report.to_dict()
            hooks.check_cancelled()
            stable, stable_ref = (None, None)
            assert golden_report is not None
            with phase(trace, "gate", threshold=spec.threshold) as sp:
                if registry is not None:
                    stable, stable_ref = stable_score(registry, spec, golden_report.sha256,
                                                      golden, spec.scorer, work_dir)
                decision = gate(eval_report.score, threshold=spec.threshold,
                                stable_score=stable, tolerance=spec.tolerance)
                note(sp, **{"gate.passed": decision.passed, "gate.reason": decision.reason,
                            "gate.stable_score": stable})
            result["gate"] = {**decision.to_dict(), "stable": stable_ref}
            store.add_event(job_id, f"Evaluation gate: {decision.reason}", data=result["gate"],
                            level="info" if decision.passed else "warn")
            if not decision.passed:
                return finish(JobOutcome("failed", result=result, error={
                    "message": f"evaluation gate failed: {decision.reason}",
                    "code": "evaluation_gate_failed", "param": None}))
        else:
            store.add_event(job_id, "No golden file: the gate cannot pass", level="warn")
            return finish(JobOutcome("failed", result=result, error={
                "message": "a golden file is required for the evaluation gate",
                "code": "golden_file_missing", "param": "golden_file"}))
        hooks.check_cancelled()

        if registry is None:
            return finish(JobOutcome("succeeded", result=result))
        if not store.claim(job_id):
            # Failed by the stale-job sweep (or cancelled) meanwhile: such a job never registers.
            return finish(JobOutcome("failed", result=result, error=worker_lost_error()))
        meter.enter("register")
        with phase(trace, "register") as sp:
            ref = register(registry, spec, adapter_dir, result, golden_report, eval_report)
            rollout = hand_over(registry, spec, ref)
            note(sp, **{"adapter.version": ref, "hand_over": rollout["message"]})
        result["rollout"] = rollout
        store.add_event(job_id, f"Registered {ref}; {rollout['message']}", data=rollout)
        return finish(JobOutcome("succeeded", fine_tuned_model=ref, result=result,
                                 message=f": {ref}; {rollout['message']}", next_steps=rollout))
    except JobCancelled:
        if getattr(cancel, "reason", "cancelled") == "timeout":
            return finish(JobOutcome("failed", result=result, error={
                "message": "the job ran past its time limit", "code": "timeout", "param": None}))
        return finish(JobOutcome("cancelled", result=result))
    except DatasetRejected as exc:
        result["validation_error"] = exc.report.to_dict()
        return finish(JobOutcome("failed", result=result, error={
            "message": exc.message, "code": exc.code, "param": exc.param}))
    except Exception as exc:  # the job fails with the reason; the worker stays up
        return finish(JobOutcome("failed", result=result, error={
            "message": f"{type(exc).__name__}: {exc}", "code": "training_error", "param": None}))


def register(registry: AdapterRegistry, spec: TrainSpec, adapter_dir: Path, result: dict[str, Any],
             golden_report: Any, eval_report: EvalReport) -> str:
    """Copy the adapter to ``staging/<job id>`` in the store and register it (moves nothing
    but ``latest``; :func:`hand_over` decides the rest)."""
    import json

    staging = f"staging/{spec.job_id}"
    registry.store.upload(adapter_dir, staging)
    from shared.quality import labels_of

    trained = json.loads((adapter_dir / "tunegate-adapter.json").read_text())
    schema = spec.metadata.get("json_schema")
    manifest = {
        **trained,
        "datasets": {"training_sha256": result["validation"]["sha256"],
                     "golden_sha256": golden_report.sha256},
        "metrics": {"golden_score": eval_report.score, "golden_n": eval_report.n,
                    "golden_sha256": golden_report.sha256, "scorer": spec.scorer or "exact",
                    "final_loss": result["train"]["final_loss"]},
        # What the quality monitor checks served answers against (shared.quality.Rules).
        "eval": {"labels": labels_of(e.messages[-1]["content"] for e in golden_report.examples),
                 "json_schema": json.loads(schema) if schema else None},
    }
    info = registry.register_version(spec.name, staging, manifest)
    return str(info.ref)


def hand_over(registry: AdapterRegistry, spec: TrainSpec, ref: str) -> dict[str, Any]:
    """After the gate: the first version of a name becomes ``stable`` at once; a later one
    enters promotion as a ``candidate`` (``shared.promotion``), unless promotions are off
    (``TUNEGATE_PROMOTION_ENABLED=false``: ``stable`` moves at once). Returns how the version
    reaches users: ``state``, ``message``, ``serving`` (what bare ``NAME`` answers with now),
    ``waits_for`` and ``promote_by_hand`` (the admin call that skips the automatic gates)."""
    from shared.errors import Conflict
    from shared.promotion import Promotions, PromotionSettings, parse_ref

    name, version = parse_ref(ref)
    settings = PromotionSettings()
    db = getattr(registry, "db", None)
    try:
        stable = registry.resolve(f"{name}:stable").version
    except (ModelNotFound, NotFound):
        stable = None
    by_hand = (f"POST /admin/promotions/{name}/promote {{\"to\": \"stable\"}} "
               f"(tunegate console: Models > {name} > Promote)")
    out: dict[str, Any] = {"model": ref, "name": name, "version": version,
                           "waits_for": None, "promote_by_hand": None}
    if stable == version:
        return {**out, "state": "stable", "serving": ref,
                "message": f"it is already {name}:stable; {name!r} answers with it"}
    if settings.enabled and stable is not None and db is not None:
        try:
            Promotions(db, registry, settings).start(  # type: ignore[arg-type]
                name, version, actor=f"trainer:{spec.job_id}",
                reason="passed the golden-set gate",
                metrics=registry.get_version(name, version).manifest.get("metrics", {}))
        except Conflict as exc:
            return {**out, "state": "not_promoted", "serving": f"{name}@v{stable}",
                    "promote_by_hand": by_hand,
                    "message": f"not promoted: {exc.message}; {name!r} still answers with "
                               f"{name}@v{stable}; call {ref} by its full name"}
        waits = (f"shadow then canary traffic on {name!r}: {settings.min_samples} scored "
                 f"samples per stage (labelled or rule-checked sampled requests)")
        return {**out, "state": "candidate", "serving": f"{name}@v{stable}", "waits_for": waits,
                "promote_by_hand": by_hand,
                "message": f"it entered promotion as a candidate; {name!r} answers with "
                           f"{name}@v{stable} until the promotion reaches stable (it waits for "
                           f"{waits}); call {ref} by its full name now, or promote by hand: "
                           f"{by_hand}"}
    registry.set_alias(name, "stable", version, reason=f"gate passed ({spec.job_id})")
    return {**out, "state": "stable", "serving": ref,
            "message": f"moved {name}:stable to it; {name!r} answers with it"}
