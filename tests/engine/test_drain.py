"""Graceful drain on SIGTERM (engine.drain), with a real gateway and the real SmolLM2 engine:
the replica deregisters while a stream it serves is still running, the stream then ends
normally (all its tokens, ``finish_reason``, ``[DONE]``, no error event), and only then does the
process exit.

- embedded kind: SIGTERM to the engine process itself;
- vLLM kind: SIGTERM to the launcher only (as the kubelet sends it to a container's PID 1), with
  the launcher's child standing in for vLLM's server being the embedded engine (same protocol,
  same ``vllm:`` metric names the drain watches).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from tests.engine.test_register import eventually, replicas
from tests.gateway.conftest import Records, auth, gateway
from tests.procs import free_port, run_server

TOKENS = 48  # long enough (several seconds on 2 cores) to be mid-stream at SIGTERM


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw-drain")


@pytest.fixture(scope="module")
def admin(data_dir: Path) -> str:
    return Records(data_dir).key("admin")


@pytest.fixture(scope="module")
def gw(data_dir: Path) -> Iterator[str]:
    with gateway(data_dir, []) as url:
        yield url


class Stream(threading.Thread):
    """A streaming chat through the gateway, read in the background; ``first`` is set at the
    first content chunk."""

    def __init__(self, gw: str, key: str) -> None:
        super().__init__(daemon=True)
        self.gw, self.key = gw, key
        self.first = threading.Event()
        self.events: list[str] = []
        self.ended_at = 0.0

    def run(self) -> None:
        body = {
            "model": "base",
            "stream": True,
            "max_tokens": TOKENS,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Count to one hundred."}],
        }
        with httpx.stream(
            "POST", f"{self.gw}/v1/chat/completions", headers=auth(self.key), json=body, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    if '"content"' in line:
                        self.first.set()
        self.ended_at = time.monotonic()
        self.first.set()

    def check_clean(self) -> None:
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]
        chunks = [json.loads(e) for e in self.events[:-1]]
        assert not [c for c in chunks if "error" in c], chunks[-2:]
        finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
        assert finish[-1] == "length"
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage[-1]["completion_tokens"] == TOKENS  # every token was generated and sent


def _drain_and_watch(
    gw: str,
    admin: str,
    url: str,
    signal_target: subprocess.Popen[bytes],
) -> None:
    eventually(lambda: replicas(gw, admin).get(url, {}).get("healthy") is True, 60)
    stream = Stream(gw, admin)
    stream.start()
    assert stream.first.wait(120), "no first token"
    assert stream.ended_at == 0.0, "the stream ended before SIGTERM: make TOKENS larger"
    signal_target.send_signal(signal.SIGTERM)
    eventually(lambda: url not in replicas(gw, admin), 15)
    deregistered_at = time.monotonic()
    stream.join(120)
    assert stream.ended_at > deregistered_at, "deregistered only after the stream ended"
    stream.check_clean()
    signal_target.wait(60)


def _engine_registered(
    gw: str, admin: str, args: list[str], port: int, env: dict[str, str], log: Path
) -> AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    """``tunegate engine serve ARGS --port PORT --register GW``, the admin key in the
    environment as `tunegate up` passes secrets (never on a command line)."""
    return run_server(
        ["-m", "tunegate", "engine", "serve", *args, "--port", str(port), "--register", gw],
        port=port, env={"TUNEGATE_ENGINE_REGISTER_KEY": admin, "TUNEGATE_ENGINE_DRAIN_GRACE_S": "1",
                        "TUNEGATE_ENGINE_DRAIN_TIMEOUT_S": "60", **env},
        timeout_s=240, log=log)


def test_embedded_engine_drains_on_sigterm(
    gw: str, admin: str, default_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "engine.log"
    with _engine_registered(
        gw, admin, ["--model", str(default_model_dir), "--max-model-len", "512",
                    "--max-num-seqs", "4"], port, {}, log,
    ) as (_, proc):
        _drain_and_watch(gw, admin, url, proc)
    text = log.read_text()
    assert text.index("draining") < text.index("Shutting down")


def test_vllm_kind_launcher_drains_its_server(
    gw: str, admin: str, default_model_dir: Path, tmp_path: Path
) -> None:
    # vLLM's interpreter stand-in: serves the embedded engine on the port vLLM was asked for.
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\nport=''\n"
        'while [ $# -gt 0 ]; do [ "$1" = --port ] && port="$2"; shift; done\n'
        f"exec {sys.executable} -m tunegate engine serve --kind embedded --model "
        f'{default_model_dir} --port "$port" --max-model-len 512 --max-num-seqs 4\n'
    )
    python.chmod(0o755)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TUNEGATE_VLLM_PYTHON": str(python), "TUNEGATE_VLLM_DEVICE": "cpu",
           "TUNEGATE_ENGINE_REGISTER_INTERVAL_S": "1"}
    log = tmp_path / "launcher.log"
    with _engine_registered(
        gw, admin, ["--kind", "vllm", "--model", str(default_model_dir)], port, env, log,
    ) as (_, proc):
        _drain_and_watch(gw, admin, url, proc)
        assert proc.returncode is not None
    # The server is gone with its launcher (its port is free again).
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
    assert "draining" in log.read_text()
