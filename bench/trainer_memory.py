"""Resident memory of a real trainer worker across steps and jobs, and how good its ETA is.

Starts ``tunegate trainer worker --role train`` as its own process (arq on real Redis, a private
queue and data folder), queues jobs through the product's queue path (the job record, then
``shared.job_queue.enqueue_training``, what the gateway does), each a LoRA tune of the real
SmolLM2-135M-Instruct on Rotten Tomatoes chat lines, golden evaluation and registration
included, one after the other; samples the worker's VmRSS and the job row every
``--poll-s`` seconds.

    python bench/trainer_memory.py --steps 300 --steps2 100 --out bench/results/trainer_memory.json

Keys: ``rss_idle_mib`` (worker started, no job yet), ``rss_start_mib`` (job 1 at step 10, model
loaded and warmed up), ``rss_job1_last_step_mib``, ``rss_after_job1_mib`` / ``rss_after_job2_mib``
(worker idle after each job), ``rss_growth_within_job_mib`` (job 1: last step minus step 10),
``rss_growth_across_jobs_mib`` (after job 2 minus after job 1), ``rss_peak_mib``; for the ETA,
per job ``eta_error_at_step{5,10,20}`` (|predicted - actual| / actual seconds left, where
predicted is the job row's ``estimated_finish`` at that step and actual the end of training,
which is what ``estimated_finish`` covers) and ``eta_error_vs_job_end_at_step{5,10,20}`` (the
same against the job's ``finished_at``, evaluation and registration included).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ETA_STEPS = (5, 10, 20)


def vm_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _ts(value: Any) -> float:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run_job(ctx: dict[str, Any], steps: int, seed: int) -> dict[str, Any]:
    from shared.job_queue import enqueue_training, new_job_id
    from shared.job_records import TERMINAL
    from shared.job_spec import TrainSpec

    store, pid, args = ctx["store"], ctx["pid"], ctx["args"]
    spec = TrainSpec(job_id=new_job_id(), name="bench-memory", base_model=str(ctx["base"]),
                     training_file=str(ctx["train"]), golden_file=str(ctx["golden"]),
                     batch_size=args.batch_size, max_steps=steps, seed=seed, threshold=0.0,
                     eval_max_new_tokens=3)
    store.create(spec.job_id, model="SmolLM2-135M-Instruct", name=spec.name,
                 spec=spec.model_dump())
    await enqueue_training(ctx["pool"], spec, queue_name=ctx["queue"])
    rss_by_step: dict[int, float] = {}
    at_step: dict[int, dict[str, float]] = {}  # step -> {finish, eta_s} as the job row said
    samples: list[tuple[float, float]] = []
    t0 = time.time()
    while True:
        await asyncio.sleep(args.poll_s)
        rss = vm_rss_mib(pid)
        if rss is None:
            raise RuntimeError("the worker process died")
        samples.append((round(time.time() - t0, 1), round(rss)))
        job = store.get(spec.job_id)
        progress = (job or {}).get("progress") or {}
        step = progress.get("step")
        if step and job["estimated_finish"] is not None and step not in at_step:
            at_step[step] = {"finish": _ts(job["estimated_finish"]), "eta_s": progress["eta_s"]}
            rss_by_step[step] = rss
        if job["status"] in TERMINAL:
            break
    gate_failed = (job.get("error") or {}).get("code") == "evaluation_gate_failed"
    if job["status"] != "succeeded" and not gate_failed:  # a refusing gate: trained all the same
        raise RuntimeError(f"job {spec.job_id} ended {job['status']}: {job.get('error')}")
    last = max(at_step)
    train_end = at_step[last]["finish"]  # the last step's row: now + ~0 s
    job_end = _ts(job["finished_at"])
    out: dict[str, Any] = {"job_id": spec.job_id, "status": job["status"], "steps": last,
                           "seconds": round(job_end - t0, 1),
                           "train_end_to_job_end_s": round(job_end - train_end, 1)}
    for k in ETA_STEPS:
        seen = [s for s in at_step if s >= k]
        if not seen or min(seen) >= last:  # nothing left to predict at the last step
            continue
        s = min(seen)
        row = at_step[s]
        at = row["finish"] - row["eta_s"]  # when step s ended
        out[f"eta_step{k}_observed_at_step"] = s
        out[f"eta_error_at_step{k}"] = round(abs(row["eta_s"] - (train_end - at))
                                             / (train_end - at), 3)
        out[f"eta_error_vs_job_end_at_step{k}"] = round(abs(row["eta_s"] - (job_end - at))
                                                        / (job_end - at), 3)
    out["rss_by_step_mib"] = {str(s): round(v) for s, v in sorted(rss_by_step.items())}
    out["rss_samples"] = samples
    return out


async def idle_rss(pid: int, seconds: float) -> float:
    await asyncio.sleep(seconds)
    rss = vm_rss_mib(pid)
    if rss is None:
        raise RuntimeError("the worker process died")
    return rss


def step_rss(job: dict[str, Any], step: int) -> float:
    by = {int(s): v for s, v in job["rss_by_step_mib"].items()}
    return by[min((s for s in by if s >= step), default=max(by))]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from arq import create_pool

    from shared.data import write_jsonl
    from shared.db import Database
    from shared.job_records import JobStore
    from shared.queue import arq_options, redis_settings
    from shared.settings import StorageSettings
    from trainer.data_sources import build_splits

    data_dir = Path(tempfile.mkdtemp(prefix="trainer-memory-"))
    queue = f"tunegate:bench:{secrets.token_hex(4)}"
    train, golden = build_splits(n_train=args.n_train, n_golden=args.n_golden, seed=0)
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(data_dir), "REDIS_URL": args.redis_url,
           "TUNEGATE_TRAINER_QUEUE_NAME": queue, "TUNEGATE_TRAINER_BACKEND": "cpu",
           "TUNEGATE_TRAINER_PROGRESS_INTERVAL_S": "0", "TUNEGATE_TRAINER_INGEST_TRAFFIC": "0"}
    cmd = [sys.executable, "-m", "tunegate", "trainer", "worker", "--role", "train"]
    db = Database(StorageSettings(data_dir=data_dir).db_url)  # the schema, before the worker
    log = (data_dir / "worker.log").open("w")
    worker = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT, stdout=log,
                                                  stderr=asyncio.subprocess.STDOUT)
    pool = await create_pool(redis_settings(args.redis_url), **arq_options())
    ctx = {"store": JobStore(db), "pid": worker.pid, "args": args, "queue": queue, "pool": pool,
           "base": StorageSettings().default_model_dir,
           "train": write_jsonl(data_dir / "train.jsonl", train),
           "golden": write_jsonl(data_dir / "golden.jsonl", golden)}
    try:
        rss_idle = await idle_rss(worker.pid, args.settle_s)
        load_before = load_average()
        job1 = await run_job(ctx, args.steps, seed=1)
        after1 = await idle_rss(worker.pid, args.settle_s)
        partial = {"partial": "job 1 only", "rss_idle_mib": round(rss_idle),
                   "rss_after_job1_mib": round(after1), "jobs": [job1]}
        args.out.write_text(json.dumps(partial, indent=1))  # kept if job 2 never ends
        job2 = await run_job(ctx, args.steps2, seed=2)
        after2 = await idle_rss(worker.pid, args.settle_s)
    finally:
        worker.terminate()
        try:
            await asyncio.wait_for(worker.wait(), 120)
        except TimeoutError:
            worker.kill()
        await pool.aclose()
        db.dispose()
        print((data_dir / "worker.log").read_text()[-2000:], file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)
    start = step_rss(job1, 10)
    last1 = step_rss(job1, job1["steps"])
    peak = max(v for j in (job1, job2) for _, v in j["rss_samples"])
    return {
        "command": " ".join(["python", "bench/trainer_memory.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPU cores, shared",
        "load_average_before": load_before, "load_average_after": load_average(),
        "model": "SmolLM2-135M-Instruct", "batch_size": args.batch_size,
        "rss_idle_mib": round(rss_idle), "rss_start_mib": round(start),
        "rss_job1_last_step_mib": round(last1),
        "rss_after_job1_mib": round(after1), "rss_after_job2_mib": round(after2),
        "rss_peak_mib": round(peak),
        "rss_growth_within_job_mib": round(last1 - start),
        "rss_growth_across_jobs_mib": round(after2 - after1),
        "jobs": [job1, job2],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of the first job")
    ap.add_argument("--steps2", type=int, default=100, help="optimizer steps of the second job")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=1160)
    ap.add_argument("--n-golden", type=int, default=20)
    ap.add_argument("--poll-s", type=float, default=0.5)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(result, indent=1))
    short = {k: v for k, v in result.items() if k != "jobs"}
    short["jobs"] = [{k: v for k, v in j.items() if not k.startswith("rss_")}
                     for j in result["jobs"]]
    print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
