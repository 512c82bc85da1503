"""`tunegate up --distributed`: the shape of a Kubernetes deployment, on one machine.

Several gateway processes (one port each), embedded engine replicas that register themselves
with the gateways (each with one of them; all gateways see every replica through SQL), a
training worker (``--role train``) and a monitor worker (``--role monitor``), on one PostgreSQL
database (``TUNEGATE_DATABASE_URL``) and one Redis. :class:`Topology` starts, kills and restarts
each process by name; the benchmark and the test of this shape drive it the same way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import StorageSettings
from tunegate.up import (
    Child,
    Supervisor,
    UpSettings,
    banner,
    interrupt,
    local_admin_key,
    port_free,
    start_redis,
)


@dataclass
class TopologyConfig:
    gateways: int = 2
    engines: int = 2
    host: str = "127.0.0.1"
    gateway_port: int = 8000  # gateway i listens on gateway_port + i
    engine_port: int = 8101  # engine i listens on engine_port + i
    max_num_seqs: int = 8  # per engine replica
    max_model_len: int = 1024  # tokens, per engine replica (KV cache size)
    health_interval_s: float = 1.0  # gateways' health rounds, seconds
    register_interval_s: float = 5.0  # engines' re-registration heartbeat, seconds


@dataclass
class Topology:
    """The processes of the distributed shape, under one :class:`Supervisor`."""

    sup: Supervisor
    env: dict[str, str]  # every process's environment (database, Redis, data folder)
    model_dir: Path
    admin_key: str
    cfg: TopologyConfig = field(default_factory=TopologyConfig)
    children: dict[str, Child] = field(default_factory=dict)

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.cfg.gateway_port + i}" for i in range(self.cfg.gateways)]

    @property
    def engine_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.cfg.engine_port + i}" for i in range(self.cfg.engines)]

    def _tg(self) -> list[str]:
        return [sys.executable, "-m", "tunegate"]

    def start_gateway(self, i: int) -> Child:
        env = {
            **self.env,
            "TUNEGATE_GATEWAY_ENGINES": "",
            "TUNEGATE_GATEWAY_HEALTH_INTERVAL_S": str(self.cfg.health_interval_s),
        }
        port = self.cfg.gateway_port + i
        child = self._start(
            f"gateway-{i}",
            [*self._tg(), "gateway", "serve", "--host", self.cfg.host, "--port", str(port)],
            env,
        )
        self.sup.wait_http(child, f"http://127.0.0.1:{port}/health", 120)
        return child

    def start_engine(self, i: int, wait: bool = True) -> Child:
        # Engine i registers with gateway i (mod the count): any one is enough, the record is
        # in SQL and every gateway reads it at its next health round.
        gateway = self.gateway_urls[i % self.cfg.gateways]
        env = {
            **self.env,
            "TUNEGATE_ENGINE_REGISTER_KEY": self.admin_key,
            "TUNEGATE_ENGINE_REGISTER_INTERVAL_S": str(self.cfg.register_interval_s),
            "TUNEGATE_ENGINE_DRAIN_GRACE_S": str(2 * self.cfg.health_interval_s),
        }
        port = self.cfg.engine_port + i
        child = self._start(
            f"engine-{i}",
            [
                *self._tg(),
                "engine",
                "serve",
                "--kind",
                "embedded",
                "--model",
                str(self.model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-num-seqs",
                str(self.cfg.max_num_seqs),
                "--max-model-len",
                str(self.cfg.max_model_len),
                "--register",
                gateway,
            ],
            env,
        )
        if wait:
            self.sup.wait_http(child, f"http://127.0.0.1:{port}/health", 300)
        return child

    def start_workers(self) -> None:
        env = {
            **self.env,
            "TUNEGATE_MONITOR_GATEWAY_URL": self.gateway_urls[0],
            "TUNEGATE_MONITOR_API_KEY": self.admin_key,
        }
        self._start(
            "trainer",
            [*self._tg(), "trainer", "worker", "--role", "train"],
            {**env, "TUNEGATE_TRAINER_INGEST_TRAFFIC": "false"},
        )
        self._start("monitor", [*self._tg(), "trainer", "worker", "--role", "monitor"], env)

    def start_all(self) -> None:
        for i in range(self.cfg.gateways):
            self.start_gateway(i)
        engines = [self.start_engine(i, wait=False) for i in range(self.cfg.engines)]
        for i, child in enumerate(engines):
            self.sup.wait_http(child, f"{self.engine_urls[i]}/health", 300)
        self.start_workers()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal ``name``'s whole process group (SIGKILL: a crash, nothing runs after it)."""
        child = self.children[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, sig)
        child.proc.wait(60)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        old = self.children.get(name)
        if old is not None and old in self.sup.children:
            self.sup.children.remove(old)
        child = self.sup.start(name, cmd, env)
        self.children[name] = child
        return child


def run_distributed(cfg: TopologyConfig) -> int:
    """`tunegate up --distributed` (tunegate.topology): refuses without PostgreSQL, since
    several gateway processes sharing SQLite would serialise on its lock."""
    from tunegate.topology import Topology

    common = StorageSettings()
    db_url = common.db_url
    if not db_url.startswith("postgresql"):
        print("tunegate up --distributed: set TUNEGATE_DATABASE_URL=postgresql://... "
              "(every process shares it)", file=sys.stderr)
        return 2
    ports = [cfg.gateway_port + i for i in range(cfg.gateways)]
    ports += [cfg.engine_port + i for i in range(cfg.engines)]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        print(f"tunegate up: ports in use: {busy}", file=sys.stderr)
        return 2
    from shared.db import Database

    # The schema before anything starts: a database behind stops here with the command to run
    # (or is upgraded, with TUNEGATE_DATABASE_AUTO_MIGRATE=true).
    Database.from_settings(common).dispose()
    from engine.models import pull_default_model

    model_dir = pull_default_model(common.default_model_dir).path
    log_dir = common.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(log_dir)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        redis_url = UpSettings().redis_url or start_redis(sup, common.data_dir)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDIS_URL": redis_url,
               "TUNEGATE_DATA_DIR": str(common.data_dir), "TUNEGATE_DATABASE_URL": db_url,
               "TUNEGATE_ENGINE_API_KEY": secrets.token_urlsafe(32)}
        key = local_admin_key(common.data_dir, db_url)
        _ensure_key(db_url, key)
        topo = Topology(sup, env, model_dir, key, cfg)
        topo.start_all()
        print(banner(topo.gateway_urls[0], key, log_dir), flush=True)
        print("Gateways: " + ", ".join(topo.gateway_urls) + "\nEngines: "
              + ", ".join(topo.engine_urls), flush=True)
        return sup.watch()
    except KeyboardInterrupt:
        return 0
    finally:
        sup.stop_all()


def _ensure_key(db_url: str, key: str) -> None:
    """The local admin key file may come from a run on another database (SQLite, say): make
    the same key in this one when it is not there (in this process: never on a command line)."""
    from gateway.auth import KeyStore, hash_key
    from shared.db import Database

    db = Database(db_url)
    try:
        store = KeyStore(db)
        if store.lookup(hash_key(key)) is None:
            store.create(name="local-admin", scope="admin", secret=key)
    finally:
        db.dispose()
