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
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tunegate.up import Child, Supervisor


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
