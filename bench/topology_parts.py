"""The parts of bench/topology.py: KEDA's arithmetic on the manifests' queries, the load
(the ``openai`` SDK through both gateways), small helpers, the quota and fine-tuning phases."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s" / "base"


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

async def down_since(gateways: list[str], key: str, replica: str) -> list[float]:
    """Each gateway's ``down_since`` for ``replica`` (wall clock, from ``/admin/replicas``),
    polled until every gateway reports one."""
    seen: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {key}"}) as c:
        for _ in range(600):
            for g in gateways:
                if g in seen:
                    continue
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    data = (await c.get(f"{g}/admin/replicas")).json()["data"]
                    t = next((d.get("down_since") for d in data if d["url"] == replica), None)
                    if t is not None:
                        seen[g] = float(t)
            if len(seen) == len(gateways):
                return [seen[g] for g in gateways]
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{replica}: not marked down by every gateway")


def unreachable_count(gateway: str, replica: str) -> int:
    """Failed attempts to reach ``replica`` from ``gateway``'s request path (its metric)."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    m = re.search(r'tunegate_gateway_upstream_errors_total\{kind="unreachable",replica="'
                  + re.escape(replica) + r'"\} ([0-9.]+)', text)
    return int(float(m.group(1))) if m else 0


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


def quota_burst(gws: list[str], key: str, rpm: int, rds: Any) -> dict[str, Any]:
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


def fine_tune(topo: Any, admin: str, rds: Any, data: Path) -> dict[str, Any]:
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
