"""The job pipeline end to end on CPU with real data and the real SmolLM2: validate -> train ->
evaluate -> gate -> register. A short real tune (15 steps of 8 reviews) must raise golden accuracy
above the untuned model's; a tune on shuffled labels must be rejected by the gate, leaving
``stable`` where it was and nothing new in the registry."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from shared.data import write_jsonl
from shared.db import Database
from shared.job_records import JobStore
from shared.job_spec import TrainSpec
from shared.registry import Registry
from trainer.data_sources import build_splits, shuffled_labels
from trainer.jobs import JobOutcome, run_job

STEPS = 15
N_GOLDEN = 40


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pipeline")
    train, golden = build_splits(n_train=400, n_golden=N_GOLDEN, seed=0)
    db = Database(f"sqlite:///{root / 'db.sqlite'}")
    return {
        "root": root,
        "base": default_model_dir,
        "train": write_jsonl(root / "train.jsonl", train),
        "shuffled": write_jsonl(root / "shuffled.jsonl", shuffled_labels(train, seed=1)),
        "golden": write_jsonl(root / "golden.jsonl", golden),
        "store": JobStore(db),
        "registry": Registry(db, str(root / "artifacts")),
    }


def submit(env: dict[str, Any], job_id: str, training_file: Path, **kw: Any) -> JobOutcome:
    spec = TrainSpec(
        job_id=job_id, name="rt", base_model=str(env["base"]), training_file=str(training_file),
        golden_file=str(env["golden"]), max_steps=STEPS, batch_size=8, learning_rate=1e-3,
        threshold=0.7, eval_max_new_tokens=4, seed=0, **kw,
    )
    env["store"].create(job_id, model="SmolLM2-135M-Instruct", name="rt", spec=spec.model_dump())
    return run_job(spec, store=env["store"], registry=env["registry"],
                   work_dir=env["root"] / "work" / job_id, cancel=threading.Event(),
                   progress_interval_s=0.0, files_dir=env["root"] / "files")


@pytest.fixture(scope="module")
def tuned(env: dict[str, Any]) -> JobOutcome:
    return submit(env, "ftjob-real", env["train"], evaluate_base=True)


def test_real_tune_raises_golden_accuracy_and_registers(
    env: dict[str, Any], tuned: JobOutcome
) -> None:
    assert tuned.status == "succeeded", tuned.error
    before = tuned.result["base_eval"]["score"]
    after = tuned.result["eval"]["score"]
    print(f"golden accuracy on {N_GOLDEN}: before {before:.2f}, after {after:.2f}; "
          f"train {tuned.result['train']['train_s']:.1f} s for {STEPS} steps")
    assert after > before
    assert tuned.result["gate"]["passed"]
    assert tuned.fine_tuned_model == "rt@v1"
    resolved = env["registry"].resolve("rt")
    assert resolved.version == 1
    folder = Path(resolved.path)
    assert {"adapter_config.json", "adapter_model.safetensors", "tunegate-manifest.json"} <= {
        p.name for p in folder.iterdir()}
    manifest = env["registry"].get_version("rt", 1).manifest
    assert manifest["metrics"]["golden_score"] == after
    assert manifest["lora"]["r"] == 16 and manifest["base_model_sha256"]
    job = env["store"].get("ftjob-real")
    assert job["status"] == "succeeded" and job["trained_tokens"] > 0
    assert job["trained_tokens"] == tuned.result["train"]["tokens"]
    assert job["progress"]["step"] == STEPS and job["estimated_finish"] is None
    metrics = [e for e in env["store"].events("ftjob-real") if e["type"] == "metrics"]
    assert metrics[-1]["data"]["step"] == STEPS  # OpenAI's metrics shape
    assert {"step", "train_loss", "total_steps", "learning_rate", "tokens_per_s", "eta_s"} <= \
        set(metrics[-1]["data"])
    assert len(metrics) < STEPS  # sparse: milestones stay visible
    # The CSV lives in the (local) artifact store, as uploads do.
    rows = (env["root"] / "artifacts" / "files" / f"{job['result_file']}.csv").read_text(
    ).splitlines()
    assert rows[0].startswith("step,train_loss,learning_rate,tokens_per_s")
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, STEPS + 1))
    last = env["store"].events("ftjob-real", newest_first=True, limit=2)
    assert last[0]["message"].startswith("Job succeeded: rt@v1; moved rt:stable to it")
    assert last[0]["data"]["serving"] == "rt@v1"
    assert not (env["root"] / "work" / "ftjob-real").exists()  # private work folder cleaned


def test_shuffled_labels_are_rejected_and_stable_stays(
    env: dict[str, Any], tuned: JobOutcome
) -> None:
    assert tuned.status == "succeeded"
    out = submit(env, "ftjob-shuffled", env["shuffled"])
    print(f"shuffled labels: golden accuracy {out.result['eval']['score']:.2f}")
    assert out.status == "failed"
    assert out.error is not None and out.error["code"] == "evaluation_gate_failed"
    assert out.fine_tuned_model is None
    assert env["registry"].resolve("rt").version == 1
    assert [v["version"] for v in env["registry"].get_adapter("rt")["versions"]] == [1]
    assert not (env["root"] / "artifacts" / "staging" / "ftjob-shuffled").exists()
    assert env["store"].get("ftjob-shuffled")["error"]["code"] == "evaluation_gate_failed"


def test_rejected_file_fails_with_the_report(env: dict[str, Any]) -> None:
    bad = env["root"] / "bad.jsonl"
    lines = Path(env["train"]).read_text().splitlines()[:50]
    lines[3] = "{oops"
    lines[7] = '{"instruction": "x"}'
    bad.write_text("\n".join(lines) + "\n")
    out = submit(env, "ftjob-bad", bad)
    assert out.status == "failed" and out.error is not None
    assert out.error["code"] == "invalid_training_file"
    assert "line 4: invalid JSON" in out.error["message"]
    assert "line 8 field 'output'" in out.error["message"]
