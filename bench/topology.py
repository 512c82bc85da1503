"""The distributed shape on one host (tunegate.topology), under load, with failures.

2 gateway processes, 2 self-registering embedded engines (real SmolLM2), a training and a
monitor worker, PostgreSQL (a fresh schema in ``--pg``) and one private Redis, and a real
Prometheus (Debian's ``prometheus``) scraping the engines every second. Load goes through both
gateways with the real ``openai`` SDK (its own retries off). In order:

1. quota: a key of ``rpm`` R takes 2R requests spread over both gateways; at most R succeed;
2. load (non-streaming base and adapter requests, streams) with the KEDA engine ScaledObject's
   queries from deploy/k8s evaluated on Prometheus every second; the adapter version must end
   up on one replica only (affinity);
3. a replica is killed (SIGKILL) mid-load: non-streaming requests must all succeed (retried
   elsewhere), streams on it end with an error event and ``[DONE]``; it is restarted and must
   register itself again;
4. a gateway is killed (SIGKILL) mid-load: the other keeps serving; a key and a file created
   through the dead one before are still there through the survivor;
5. a fine-tuning job submitted through one gateway (smallest real tune) is promoted and served
   through the other, loaded on one replica; the trainer's ScaledObject (KEDA's Redis scaler:
   the arq queue's ZCARD) asks for 1 while it is queued or running, 0 after;
6. after the load (its TTFT window past) the engine ScaledObject falls back to its minimum.

Run: ``python bench/topology.py --requests 1000`` (writes bench/results/topology.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench.* and tests.protocol_checks

from bench.common import percentile  # noqa: E402
from bench.topology_parts import (  # noqa: E402
    Load,
    down_since,
    engine_desired,
    fine_tune,
    free_ports,
    held_by,
    queue_desired,
    quota_burst,
    registered,
    start_prometheus,
    unreachable_count,
    wait_for,
)

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TTFT_WINDOW_S = 120  # the [2m] of the TTFT trigger's rate()


# ---- the scenario ----------------------------------------------------------------------------
def run(
    work: Path, *, requests: int, pg_url: str = PG_URL, concurrency: int = 16, quota_rpm: int = 20
) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    schema = "topo_" + uuid.uuid4().hex[:10]
    admin_engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with admin_engine.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        return _run(
            work,
            schema,
            requests=requests,
            pg_url=pg_url,
            concurrency=concurrency,
            quota_rpm=quota_rpm,
        )
    finally:
        with admin_engine.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin_engine.dispose()


def _run(
    work: Path, schema: str, *, requests: int, pg_url: str, concurrency: int, quota_rpm: int
) -> dict[str, Any]:
    import redis as redis_lib

    from gateway.auth import KeyStore
    from shared.db import Database, database_url
    from shared.registry import Registry
    from shared.settings import StorageSettings
    from tests.protocol_checks import make_adapter
    from tunegate.topology import Topology, TopologyConfig
    from tunegate.up import Supervisor, start_redis

    model_dir = StorageSettings().default_model_dir
    data = work / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    db_url = database_url(data, pg_url) + f"?options=-csearch_path%3D{schema}"
    db = Database(db_url, auto_migrate=True)  # a fresh schema: migrated to head once, here
    keys = KeyStore(db)
    admin, _ = keys.create(name="topology-admin", scope="admin")
    limited, _ = keys.create(name="topology-quota", scope="user", rpm=quota_rpm)
    registry = Registry(db, str(data / "artifacts"))
    rel = f"staging/{uuid.uuid4().hex}"
    make_adapter(
        model_dir, Path(registry.store.root) / rel, rank=8, seed=7, targets=["q_proj", "v_proj"]
    )
    adapter = registry.register_version("topo", rel, {"base_model": model_dir.name}).ref
    registry.set_alias("topo", "stable", 1)

    sup = Supervisor(work / "logs")
    (work / "logs").mkdir()
    figures: dict[str, Any] = {"requests": 0}
    try:
        redis_url = start_redis(sup, data)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "REDIS_URL": redis_url,
            "TUNEGATE_DATA_DIR": str(data),
            "TUNEGATE_DATABASE_URL": db_url,
            "TUNEGATE_ARTIFACT_STORE": "",
            "TUNEGATE_GATEWAY_SAMPLE_RATE": "0",
            "TUNEGATE_TRAINER_PROGRESS_INTERVAL_S": "0",
            "PYTHONUNBUFFERED": "1",
        }
        cfg = TopologyConfig(
            gateway_port=free_ports(2), engine_port=free_ports(2), max_num_seqs=4, max_model_len=512
        )
        topo = Topology(sup, env, model_dir, admin, cfg)
        t0 = time.monotonic()
        topo.start_all()
        gws, engines = topo.gateway_urls, topo.engine_urls
        wait_for(
            lambda: all(all(registered(g, admin).get(e) for e in engines) for g in gws),
            60,
            "both engines registered and healthy at both gateways",
        )
        figures["startup_s"] = round(time.monotonic() - t0, 1)
        prom = start_prometheus(sup, work, engines, gws)
        rds = redis_lib.Redis.from_url(redis_url)
        # Before any request: Prometheus has scraped the idle engines a few times.
        time.sleep(3)
        figures["keda_engine_replicas_before"] = engine_desired(prom)

        figures.update(quota_burst(gws, limited, quota_rpm, rds))
        figures["requests"] += 2 * quota_rpm

        clients = [
            openai.AsyncOpenAI(base_url=f"{g}/v1", api_key=admin, max_retries=0, timeout=120)
            for g in gws
        ]
        load = Load(clients, "topo")
        keda: list[tuple[float, int]] = []
        figures.update(
            asyncio.run(_load_phases(topo, load, requests, concurrency, prom, keda, admin, adapter))
        )
        load_end = time.monotonic()
        figures["requests"] += len(load.results)
        figures["keda_engine_replicas_peak"] = max(n for _, n in keda)

        figures.update(fine_tune(topo, admin, rds, data))
        figures["requests"] += 2
        # "After": once the TTFT trigger's window holds no request (the hand-over's two
        # requests are the last ones).
        last_request = time.monotonic()
        figures["load_to_handover_s"] = round(last_request - load_end, 1)
        wait = TTFT_WINDOW_S + 5 - (time.monotonic() - last_request)
        if wait > 0:
            time.sleep(wait)
        figures["keda_engine_replicas_after"] = engine_desired(prom)
        figures["keda_trainer_replicas_after"] = queue_desired(rds, "tunegate-trainer")
    finally:
        sup.stop_all()
        db.dispose()
    return figures

async def _load_phases(
    topo: Any,
    load: Load,
    requests: int,
    concurrency: int,
    prom: str,
    keda: list[tuple[float, int]],
    admin: str,
    adapter: str,
) -> dict[str, Any]:
    stop = asyncio.Event()

    async def sample_keda() -> None:
        while not stop.is_set():
            keda.append((time.monotonic(), await asyncio.to_thread(engine_desired, prom)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_keda())
    out: dict[str, Any] = {}
    gws, engines = topo.gateway_urls, topo.engine_urls
    # The adapter's first request through one gateway; the other sees the holder at its next
    # health round (1 s here), so the first loads race no more than a real deployment's.
    await load.clients[0].chat.completions.create(
        model="topo", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    await asyncio.sleep(2 * topo.cfg.health_interval_s)
    third = max(1, requests // 3)
    await load.run(third, concurrency)
    out["adapter_loads_per_version"] = len(held_by(engines, adapter))
    out["adapter_held_by"] = held_by(engines, adapter)

    # A replica dies mid-load.
    victim = 1 if engines[1] not in out["adapter_held_by"] else 0
    phase = asyncio.create_task(load.run(third, concurrency))
    await asyncio.sleep(3.0)
    killed_at, killed_wall = time.monotonic(), time.time()
    topo.kill(f"engine-{victim}")
    in_flight = [r for r in load.results if r.start < killed_at and not r.end]
    down = asyncio.create_task(down_since(gws, admin, engines[victim]))
    await asyncio.sleep(2.0)
    topo.start_engine(victim, wait=False)
    await phase
    # When each gateway stopped routing to the dead replica: the one with requests on it
    # re-sends the first of them elsewhere right then; the other hears of it through Redis.
    by_gateway = [round(max(0.0, t - killed_wall) * 1000) for t in await down]
    out["failover_ms_by_gateway"] = by_gateway
    out["failover_ms_p95"] = round(percentile(by_gateway, 95))
    out["dead_replica_failed_attempts"] = sum(
        unreachable_count(g, engines[victim]) for g in gws)
    back = await asyncio.to_thread(
        wait_for,
        lambda: all(registered(g, admin).get(engines[victim]) for g in gws),
        180,
        "the restarted replica registered again",
    )
    out["reregistered_after_s"] = round(time.monotonic() - killed_at, 1)
    out["reregistration_wait_s"] = round(back, 1)
    hit = [r for r in in_flight if r.kind != "stream"]
    out["failover_in_flight_non_streaming"] = len(hit)
    # From the replica's death to the answers, from elsewhere, of the non-streaming requests in
    # flight at that moment (those on the dead replica include their whole generation again,
    # on the survivor that now carries all the load).
    after_death = [(r.end - killed_at) * 1000 for r in hit if r.ok] or [0.0]
    out["failover_answer_ms_p95"] = round(percentile(after_death, 95))
    out["failover_answer_ms_p50"] = round(percentile(after_death, 50))
    cut = [r for r in in_flight if r.kind == "stream" and r.error]
    out["streams_cut_with_error_event"] = len(cut)
    out["streams_cut_unclean"] = len(
        [r for r in in_flight if r.kind == "stream" and not r.clean_end]
    )

    # A gateway dies mid-load; what was written through it is still there.
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {admin}"}) as c:
        made = (
            await c.post(f"{gws[1]}/admin/keys", json={"name": "made-on-gw1", "scope": "user"})
        ).json()
        lines = [
            json.dumps({"instruction": f"Review {i}: fine.", "output": "fresh"}) for i in range(20)
        ]
        up = await c.post(
            f"{gws[1]}/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("t.jsonl", ("\n".join(lines) + "\n").encode())},
        )
        assert up.status_code == 200, up.text
        f = up.json()
    phase = asyncio.create_task(load.run(requests - 2 * third, concurrency))
    await asyncio.sleep(3.0)
    gw_killed_at = time.monotonic()
    topo.kill("gateway-1")
    load.dead_gateways.add(1)
    await phase
    on_dead = [
        r
        for r in load.results
        if r.gateway == 1 and r.end > gw_killed_at and r.start < gw_killed_at
    ]
    survivor = [r for r in load.results if r.gateway == 0 and r.start > gw_killed_at]
    out["gateway_kill_lost_in_flight"] = len([r for r in on_dead if not r.ok])
    out["gateway_kill_survivor_requests"] = len(survivor)
    out["gateway_kill_survivor_failed"] = len([r for r in survivor if not r.ok])
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {admin}"}) as c:
        key_ok = (await c.get(f"{gws[0]}/admin/keys/{made['id']}")).status_code == 200
        file_ok = (await c.get(f"{gws[0]}/v1/files/{f['id']}")).status_code == 200
    out["sql_records_intact"] = key_ok and file_ok
    stop.set()
    await sampler
    excused = {id(r) for r in on_dead}
    out["failed_non_streaming"] = len(
        [r for r in load.results if r.kind != "stream" and not r.ok and id(r) not in excused]
    )
    out["failed_streams_outside_kills"] = len(
        [
            r
            for r in load.results
            if r.kind == "stream" and not r.ok and id(r) not in excused and r not in in_flight
        ]
    )
    out["errors_sample"] = sorted({r.error[:120] for r in load.results if r.error})[:5]
    for client in load.clients:
        await client.close()
    return out

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--pg", default=PG_URL, help="PostgreSQL URL (a fresh schema is made in it)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "topology.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tg-topology-") as tmp:
        figures = run(
            Path(tmp), requests=args.requests, pg_url=args.pg, concurrency=args.concurrency
        )
    figures["adapter_loads_per_version"] = max(
        figures["adapter_loads_per_version"], figures["fine_tune_loads"]
    )
    figures["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
