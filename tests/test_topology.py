"""The distributed shape on one host (``tunegate up --distributed``), driven by the same scenario
as ``bench/topology.py`` with fewer requests: 2 gateways, 2 self-registering embedded engines on
the real SmolLM2, a training and a monitor worker, PostgreSQL (a fresh schema), one Redis, a real
Prometheus evaluating the KEDA queries of deploy/k8s. The figures are asserted as behaviour
(counts, states); the timing ones are the benchmark's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.topology import run
from tests.shared.test_db import _pg_up

pytestmark = pytest.mark.slow


def test_topology_under_load_and_failures(tmp_path: Path, default_model_dir: Path) -> None:
    if not _pg_up():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (database test)")
    assert shutil.which("prometheus"), "prometheus missing: run scripts/setup.sh"
    f = run(tmp_path, requests=240, concurrency=12, quota_rpm=15)
    print(f)  # shown when an assertion fails

    # Quotas hold across both gateways: exactly the key's rpm got through in one window.
    assert f["quota_overrun_requests"] == 0
    assert f["quota_ok"] == 15 and f["quota_429"] == 15

    # Affinity: the adapter was loaded on one replica only, though both gateways served it.
    assert f["adapter_loads_per_version"] == 1, f["adapter_held_by"]

    # A replica killed mid-load: nothing non-streaming failed, streams ended cleanly (an error
    # event, not a broken connection), and the replica registered itself again.
    assert f["failover_in_flight_non_streaming"] >= 1
    assert f["failed_non_streaming"] == 0, f["errors_sample"]
    assert f["streams_cut_unclean"] == 0
    assert f["failed_streams_outside_kills"] == 0, f["errors_sample"]
    assert f["reregistered_after_s"] > 0

    # A gateway killed: the other kept serving, and what was written through it is in SQL.
    assert f["gateway_kill_survivor_requests"] > 0
    assert f["gateway_kill_survivor_failed"] == 0
    assert f["sql_records_intact"] is True

    # Submitted through one gateway, promoted, served through the other, loaded once.
    assert f["fine_tune_model"] == "topo-ft@v1"
    assert f["fine_tune_served_as"] == f["fine_tune_second_answer"] == "topo-ft@v1"
    assert f["fine_tune_loads"] == 1

    # KEDA's answers from the manifests' queries: engines 1 -> more under load -> 1; the trainer
    # 0 -> 1 with a job -> 0.
    assert f["keda_engine_replicas_before"] == 1
    assert f["keda_engine_replicas_peak"] >= 2
    assert f["keda_engine_replicas_after"] == 1
    assert (
        f["keda_trainer_replicas_idle"],
        f["keda_trainer_replicas_with_job"],
        f["keda_trainer_replicas_after"],
    ) == (0, 1, 0)


def test_up_distributed_needs_postgresql(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "TUNEGATE_DATA_DIR": str(tmp_path)}
    env.pop("TUNEGATE_DATABASE_URL", None)
    r = subprocess.run(
        [sys.executable, "-m", "tunegate", "up", "--distributed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "TUNEGATE_DATABASE_URL=postgresql://" in r.stderr
