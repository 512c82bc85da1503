"""`tunegate up` keeps its secrets: the admin key file is 0600 from the start and never written
through a symlink; Redis needs a password; engines need the shared secret (``/health`` stays
open, like vLLM's); no child's command line carries a secret (``ps`` shows command lines to every
local user). One real `tunegate up` on free ports, the real model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI

from shared.db import database_url
from tests.procs import free_port, stop
from tunegate.up import LOCAL_KEY_FILE, local_admin_key


def test_key_file_is_0600_from_the_start_and_never_follows_a_symlink(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask: only the mode given at creation protects the file
    try:
        key = local_admin_key(tmp_path, database_url(tmp_path))
    finally:
        os.umask(old)
    path = tmp_path / LOCAL_KEY_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert local_admin_key(tmp_path, database_url(tmp_path)) == key  # kept across starts

    other = tmp_path / "other"
    other.mkdir()
    target = tmp_path / "planted-target"
    (other / LOCAL_KEY_FILE).symlink_to(target)  # someone pointed the key file elsewhere
    with pytest.raises(OSError):
        local_admin_key(other, database_url(other))
    assert not target.exists()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    return dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)


def test_up_passes_no_secret_on_a_command_line_and_closes_redis_and_engines(
        default_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    shutil.copytree(default_model_dir, data / "models" / default_model_dir.name)
    port, engine_port = free_port(), free_port()
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    env.pop("REDIS_URL", None)
    log_path = tmp_path / "up.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tunegate", "up", "--port", str(port),
                             "--engine-port", str(engine_port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "tunegate is up" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        key = (data / LOCAL_KEY_FILE).read_text().strip()
        kids = _descendants(proc.pid)
        envs = [_environ(p) for p in kids if _cmdline(p)]
        engine_secret = next(e["TUNEGATE_ENGINE_API_KEY"] for e in envs
                             if "TUNEGATE_ENGINE_API_KEY" in e)
        redis_url = next(e["REDIS_URL"] for e in envs if "REDIS_URL" in e)
        password = redis.connection.parse_url(redis_url).get("password")
        assert password and len(password) >= 20 and len(engine_secret) >= 20
        for pid in [proc.pid, *kids]:
            line = _cmdline(pid)
            for secret in (key, engine_secret, password):
                assert secret not in line, f"a secret on the command line of {line[:80]!r}"

        # Redis: nothing without the password, everything with it.
        bare = redis_url.replace(f":{password}@", "")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(bare).ping()
        assert redis.Redis.from_url(redis_url).ping()

        # The engine: /v1 needs the secret, /health does not; the gateway has it.
        engine = f"http://127.0.0.1:{engine_port}"
        assert httpx.get(engine + "/health", timeout=10).status_code == 200
        anon = httpx.post(engine + "/v1/completions", timeout=10,
                          json={"model": "x", "prompt": "hi", "max_tokens": 1})
        assert anon.status_code == 401
        assert anon.json()["error"]["type"] == "authentication_error"
        load = httpx.post(engine + "/v1/load_lora_adapter", timeout=10,
                          json={"lora_name": "x", "lora_path": str(tmp_path)})
        assert load.status_code == 401
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        reply = client.chat.completions.create(
            model="base", temperature=0, max_tokens=5,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content

        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0
    finally:
        stop(proc)
        log.close()
