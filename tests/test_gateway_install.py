"""`pip install ".[gateway]"` in a fresh virtual environment: no torch, and the gateway starts and
answers. One install (about a minute and a half on a 2-core machine, most of it pip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gateway_extra_installs_and_serves_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # A copy of the sources (a build in the checkout would leave build/ behind), installed into
    # the new environment by this interpreter's pip, not editable.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("gateway", "engine", "trainer", "shared", "tunegate"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    got = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
         "--disable-pip-version-check", f"{src}[gateway]"],
        capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stderr[-4000:]

    for heavy in ("torch", "transformers", "peft", "vllm"):
        probe = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True,
                               text=True, cwd=tmp_path)
        assert probe.returncode != 0 and "No module named" in probe.stderr, heavy

    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "TUNEGATE_DATA_DIR": str(tmp_path / "data")}
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [str(venv / "bin" / "tunegate"), "gateway", "serve", "--port", str(port),
         "--engine", "http://127.0.0.1:9"],  # no engine: the gateway serves without one
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
                time.sleep(0.2)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        # A real route: without a key, OpenAI's error body.
        models = httpx.get(f"{base}/v1/models", timeout=10)
        assert models.status_code == 401
        assert set(models.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
