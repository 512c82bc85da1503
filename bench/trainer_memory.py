"""Resident memory of the CPU trainer across steps and across jobs.

Runs jobs the way ``tunegate trainer worker`` does (each in a worker thread; the job's hooks
write events, the job row and the per-step CSV to SQLite; the CPU backend trains a LoRA on a
model of SmolLM2-135M's shape, random weights, the real tokenizer) on chat examples of widely
varying length, and records the process's resident memory after every step. ``--trim-every 0``
is the behaviour before ``trainer.memory`` (freed heap pages never handed back); the default is
the worker's now.

    python bench/trainer_memory.py --tokenizer DIR --steps 150 --jobs 2 --out result.json

Writes ``rss_mib`` per step and the key figures: ``rss_start_mib`` (after the first step of the
first job), ``rss_end_mib``, ``growth_mib_per_100_steps`` (first job, step 10 to its end) and
``growth_across_jobs_mib`` (end of the last job minus end of the first).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORDS = ["the", "film", "was", "a", "quiet", "triumph", "of", "craft", "and", "nerve",
         "while", "its", "second", "half", "sags"]


def examples(n: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice([8, 20, 40, 80, 160, 300])
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append([{"role": "user", "content": f"Classify: {text}"},
                    {"role": "assistant", "content": rng.choice(["positive", "negative",
                                                                 "neutral"])}])
    return out


def random_model(tokenizer_dir: Path, target: Path, layers: int | None) -> Path:
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(tokenizer_dir))
    if layers:  # fewer blocks than SmolLM2's 30 where a step must be cheap; same widths
        config.num_hidden_layers = layers
    LlamaForCausalLM(config).float().save_pretrained(target, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, target / f.name)
    return target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--trim-every", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from shared.db import Database
    from shared.job_records import JobStore
    from shared.job_spec import TrainSpec
    from trainer.backends.cpu import CpuBackend
    from trainer.memory import TRIM_EVERY_STEPS, release, rss_bytes
    from trainer.progress import CSV_HEADER, JobHooks

    trim_every = TRIM_EVERY_STEPS if args.trim_every is None else args.trim_every
    root = Path(tempfile.mkdtemp(prefix="trainer-memory-"))
    base = random_model(args.tokenizer, root / "model", args.layers)
    store = JobStore(Database(f"sqlite:///{root / 'db.sqlite'}"))
    data = examples(args.steps * 8, seed=1)
    rss: list[list[float]] = []
    seconds: list[float] = []

    class Hooks(JobHooks):
        def on_step(self, info: Any) -> None:
            super().on_step(info)
            rss[-1].append(rss_bytes() / 2**20)

    def job(i: int) -> None:
        job_id = f"ftjob-bench{i}"
        store.create(job_id, model="m", name="bench", spec={}, status="running")
        csv = root / f"{job_id}.csv"
        csv.write_text(CSV_HEADER)
        spec = TrainSpec(job_id=job_id, name="bench", base_model=str(base), training_file="-",
                         batch_size=8, n_epochs=1, max_steps=args.steps, seed=i)
        t0 = time.monotonic()
        CpuBackend(trim_every_steps=trim_every).train(
            spec, data, root / f"out{i}", Hooks(store, job_id, threading.Event(), 2.0, csv))
        seconds.append(time.monotonic() - t0)

    for i in range(args.jobs):
        rss.append([])
        t = threading.Thread(target=job, args=(i,))  # a fresh thread per job, as an executor may
        t.start()
        t.join()
        if trim_every:
            release()  # what the worker does after every job
    first = rss[0]
    result = {
        "trim_every_steps": trim_every, "steps_per_job": args.steps, "jobs": args.jobs,
        "layers": args.layers or 30,
        "rss_start_mib": round(first[0]), "rss_end_mib": round(rss[-1][-1]),
        "growth_mib_per_100_steps": round((first[-1] - first[9]) / (len(first) - 10) * 100, 1),
        "growth_across_jobs_mib": round(rss[-1][-1] - first[-1]),
        "job_seconds": [round(s, 1) for s in seconds],
        "rss_mib": [[round(v) for v in r] for r in rss],
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
