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
import math
import os
import random
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s" / "base"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TTFT_WINDOW_S = 120  # the [2m] of the TTFT trigger's rate()


# ---- KEDA, as its scalers compute (kedacore/keda pkg/scalers) --------------------------------
def scaled_object(name: str) -> dict[str, Any]:
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ScaledObject" and doc["metadata"]["name"] == name:
                return doc
    raise KeyError(name)


def prom_value(prom: str, query: str) -> float:
    """KEDA's prometheus scaler: one sample; an empty result, NaN or Inf counts as 0
    (ignoreNullValues, its default)."""
    r = httpx.get(f"{prom}/api/v1/query", params={"query": query}, timeout=10).json()
    result = r["data"]["result"]
    if not result:
        return 0.0
    v = float(result[0]["value"][1])
    return 0.0 if math.isnan(v) or math.isinf(v) else v


def desired_replicas(so: dict[str, Any], values: list[float]) -> int:
    """The HPA's count for KEDA's AverageValue targets: the largest ceil(value / threshold)
    over triggers, within min..max; 0 when the minimum is 0 and no trigger is active."""
    spec = so["spec"]
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    counts, active = [], False
    for trig, v in zip(spec["triggers"], values, strict=True):
        meta = trig["metadata"]
        target = float(meta.get("threshold") or meta.get("listLength") or 5)
        activation = float(meta.get("activationThreshold") or meta.get("activationListLength") or 0)
        active = active or v > activation
        counts.append(math.ceil(v / target))
    if lo == 0 and not active:
        return 0
    return max(lo, min(hi, max(counts + [1])))


def engine_desired(prom: str) -> int:
    so = scaled_object("tunegate-engine")
    return desired_replicas(
        so, [prom_value(prom, t["metadata"]["query"]) for t in so["spec"]["triggers"]]
    )


def queue_desired(redis: Any, name: str) -> int:
    so = scaled_object(name)
    # KEDA's redis scaler reads a sorted set (arq's queue) with ZCARD.
    return desired_replicas(
        so, [float(redis.zcard(t["metadata"]["listName"])) for t in so["spec"]["triggers"]]
    )


# ---- load ------------------------------------------------------------------------------------
@dataclass
class Result:
    kind: str  # base | adapter | stream
    gateway: int
    start: float
    end: float = 0.0
    ok: bool = False
    status: int | None = None
    error: str = ""
    clean_end: bool = True  # False: the connection broke instead of an answer or error event


@dataclass
class Load:
    clients: list[openai.AsyncOpenAI]
    adapter: str
    dead_gateways: set[int] = field(default_factory=set)
    results: list[Result] = field(default_factory=list)
    issued: int = 0

    async def one(self, i: int) -> None:
        kind = random.choices(["base", "adapter", "stream"], [0.6, 0.25, 0.15])[0]
        alive = [g for g in range(len(self.clients)) if g not in self.dead_gateways]
        g = alive[i % len(alive)]
        res = Result(kind, g, time.monotonic())
        self.results.append(res)
        client = self.clients[g]
        model = self.adapter if kind == "adapter" else "base"
        msgs: Any = [{"role": "user", "content": f"Say one word about the number {i}."}]
        try:
            if kind == "stream":
                stream: Any = await client.chat.completions.create(
                    model=model, messages=msgs, max_tokens=8, stream=True
                )
                async for _ in stream:
                    pass
                res.ok = True
            else:
                await client.chat.completions.create(model=model, messages=msgs, max_tokens=4)
                res.ok = True
        except openai.APIStatusError as exc:
            res.status, res.error = exc.status_code, str(exc)[:200]
        except openai.APIConnectionError as exc:  # the connection broke: no clean end
            res.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            res.clean_end = False
        except openai.APIError as exc:  # the SDK raises this at a stream's error event
            res.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        res.end = time.monotonic()

    async def run(self, n: int, concurrency: int) -> None:
        queue = iter(range(self.issued, self.issued + n))
        self.issued += n

        async def worker() -> None:
            for i in queue:
                await self.one(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


# ---- helpers ---------------------------------------------------------------------------------
def free_ports(n: int) -> int:
    """A first port with the n - 1 after it free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(base + k) for k in range(n)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(check: Any, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)
    return time.monotonic() - start


def held_by(engine_urls: list[str], ref: str) -> list[str]:
    out = []
    for url in engine_urls:
        try:
            data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            continue
        if any(m["id"] == ref for m in data):
            out.append(url)
    return out


def registered(gateway: str, key: str) -> dict[str, bool]:
    r = httpx.get(
        f"{gateway}/admin/replicas", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    return {d["url"]: bool(d.get("healthy")) for d in r.json()["data"]}


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def start_prometheus(sup: Any, work: Path, engines: list[str], gateways: list[str]) -> str:
    port = free_ports(1)
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "tunegate-engine",
                "static_configs": [{"targets": [u.split("//")[1] for u in engines]}],
            },
            {
                "job_name": "tunegate-gateway",
                "static_configs": [{"targets": [u.split("//")[1] for u in gateways]}],
            },
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    child = sup.start(
        "prometheus",
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    sup.wait_http(child, f"{url}/-/ready", 60)
    return url


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

        figures.update(_quota(gws, limited, quota_rpm, rds))
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

        figures.update(_fine_tune(topo, admin, rds, data))
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


def _quota(gws: list[str], key: str, rpm: int, rds: Any) -> dict[str, Any]:
    # One fixed window on Redis's clock: start early in a minute (the burst takes seconds).
    while rds.time()[0] % 60 > 40:
        time.sleep(1)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:

            async def one(i: int) -> int:
                r = await c.post(
                    f"{gws[i % len(gws)]}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={
                        "model": "base",
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                return r.status_code

            sem = asyncio.Semaphore(8)

            async def limited(i: int) -> int:
                async with sem:
                    return await one(i)

            return await asyncio.gather(*(limited(i) for i in range(2 * rpm)))

    codes = asyncio.run(burst())
    ok = codes.count(200)
    return {
        "quota_rpm": rpm,
        "quota_ok": ok,
        "quota_429": codes.count(429),
        "quota_overrun_requests": max(0, ok - rpm),
    }


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
    killed_at = time.monotonic()
    topo.kill(f"engine-{victim}")
    in_flight = [r for r in load.results if r.start < killed_at and not r.end]
    await asyncio.sleep(2.0)
    topo.start_engine(victim, wait=False)
    await phase
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
    after_death = [(r.end - killed_at) * 1000 for r in hit if r.ok]
    out["failover_ms_p95"] = round(pct(after_death, 0.95))
    out["failover_ms_p50"] = round(pct(after_death, 0.50))
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


def _fine_tune(topo: Any, admin: str, rds: Any, data: Path) -> dict[str, Any]:
    from shared.data import write_jsonl
    from trainer.data_sources import build_splits

    topo.start_gateway(1)  # back for the hand-over
    gws = topo.gateway_urls
    submit = openai.OpenAI(base_url=f"{gws[0]}/v1", api_key=admin, max_retries=0)
    serve = openai.OpenAI(base_url=f"{gws[1]}/v1", api_key=admin, max_retries=0)
    train, golden = build_splits(n_train=40, n_golden=4, seed=0)
    with write_jsonl(data / "ft-train.jsonl", train).open("rb") as fh:
        f_train = submit.files.create(file=fh, purpose="fine-tune")
    with write_jsonl(data / "ft-golden.jsonl", golden).open("rb") as fh:
        f_golden = submit.files.create(file=fh, purpose="fine-tune")
    idle = queue_desired(rds, "tunegate-trainer")
    job = submit.fine_tuning.jobs.create(
        model=topo.model_dir.name,
        training_file=f_train.id,
        suffix="topo-ft",
        hyperparameters={"batch_size": 4, "n_epochs": 1},
        extra_body={"golden_file": f_golden.id, "max_steps": 2, "gate_threshold": 0.0},
    )
    busy = queue_desired(rds, "tunegate-trainer")
    started = time.monotonic()
    while (j := submit.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        if time.monotonic() - started > 900:
            raise TimeoutError(f"fine-tuning job still {j.status}")
        time.sleep(1)
    assert j.status == "succeeded", j.error
    ref = j.fine_tuned_model or ""
    answer = serve.chat.completions.create(
        model="topo-ft", max_tokens=2, messages=[{"role": "user", "content": "Great film"}]
    )
    answer2 = serve.chat.completions.create(
        model="topo-ft", max_tokens=2, messages=[{"role": "user", "content": "Dull"}]
    )
    return {
        "fine_tune_model": ref,
        "fine_tune_served_as": answer.model,
        "fine_tune_s": round(time.monotonic() - started, 1),
        "fine_tune_loads": len(held_by(topo.engine_urls, ref)),
        "fine_tune_second_answer": answer2.model,
        "keda_trainer_replicas_idle": idle,
        "keda_trainer_replicas_with_job": busy,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--pg", default=PG_URL, help="PostgreSQL URL (a fresh schema is made in it)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "topology.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))  # run as a script: tests.protocol_checks makes the adapter
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
