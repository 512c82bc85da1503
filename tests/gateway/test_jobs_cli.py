"""`tunegate jobs` as a user runs it: the real command in a subprocess against a gateway process
(real Redis, no trainer worker: the job stays queued until cancelled), the key from the
environment; and the progress line and verdict it prints for job objects."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shared.data import write_jsonl
from tests.gateway.conftest import Records, fake_replica, gateway
from trainer.data_sources import build_splits
from tunegate.jobs_cli import bar_line, verdict

MODEL = "SmolLM2-135M-Instruct"


def tg(url: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNEGATE_URL": url, "TUNEGATE_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "tunegate", "jobs", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_create_list_cancel(data_dir: Path, redis_url: str, default_model_dir: Path,
                            records: Records) -> None:
    (data_dir / "models").mkdir(exist_ok=True)
    link = data_dir / "models" / MODEL
    if not link.exists():
        link.symlink_to(default_model_dir, target_is_directory=True)
    train, golden = build_splits(n_train=20, n_golden=2, seed=0)
    t = write_jsonl(data_dir / "cli-train.jsonl", train)
    g = write_jsonl(data_dir / "cli-golden.jsonl", golden)
    with fake_replica("r1") as (engine, _), gateway(data_dir, [engine], redis_url) as url:
        admin = records.key("admin")
        made = tg(url, admin, "create", str(t), "--golden", str(g), "--suffix", "cli-x")
        assert made.returncode == 0, made.stderr
        job_id, status = made.stdout.split()
        assert job_id.startswith("ftjob-") and status == "queued"
        listed = tg(url, admin, "list")
        assert job_id in listed.stdout and "cli-x" in listed.stdout
        done = tg(url, admin, "cancel", job_id)
        assert done.returncode == 0 and done.stdout.split() == [job_id, "cancelled"]
        start = time.monotonic()
        followed = tg(url, admin, "follow", job_id)
        assert followed.returncode == 1 and f"{job_id}: cancelled" in followed.stdout
        assert time.monotonic() - start < 60
        refused = tg(url, records.key("user"), "list")
        assert refused.returncode == 1 and "admin key" in refused.stderr
        missing = tg(url, admin, "follow", "ftjob-nope")
        assert missing.returncode == 1 and "error 404" in missing.stderr


def test_progress_line_and_verdict() -> None:
    running = {"id": "ftjob-1", "status": "running", "estimated_finish": time.time() + 125,
               "tunegate": {"progress": {"step": 12, "total_steps": 48, "train_loss": 0.81234,
                                         "tokens_per_s": 1234.0}}}
    line = bar_line(running, width=8)
    assert line.startswith("[##......] 12/48 loss 0.8123 1,234 tok/s ETA 2 min")
    done = {"id": "ftjob-1", "status": "succeeded", "fine_tuned_model": "rt@v2", "error": None,
            "tunegate": {"result": {"gate": {"passed": True, "reason": "0.91 >= 0.80"}},
                         "rollout": {"message": "it entered promotion as a candidate"}}}
    assert verdict(done) == ["ftjob-1: succeeded", "gate: passed: 0.91 >= 0.80",
                             "model to call: rt@v2",
                             "rollout: it entered promotion as a candidate"]
