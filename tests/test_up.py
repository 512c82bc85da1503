"""`tunegate up`, the README's run command: the whole embedded system on free ports, asked the
README's question through the real `openai` SDK."""

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
import sqlalchemy as sa
from openai import OpenAI

from shared import migrate
from shared.db import database_url
from tests.procs import free_port, stop


def test_up_serves_the_default_model_through_the_gateway(
    default_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    shutil.copytree(default_model_dir, data / "models" / default_model_dir.name)
    # A records database as releases before schema migrations left it: `up` adopts it.
    old_db = sa.create_engine(database_url(data))
    migrate.first_schema().create_all(old_db)
    old_db.dispose()
    port, engine_port = free_port(), free_port()
    env = {**os.environ, "TUNEGATE_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    env.pop("REDIS_URL", None)  # up starts its own Redis
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunegate", "up", "--port", str(port),
         "--engine-port", str(engine_port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        key_file = data / "local-admin.key"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            if key_file.exists() and "tunegate is up" in (tmp_path / "up.log").read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail("tunegate up did not come up:\n" + (tmp_path / "up.log").read_text())
        key = key_file.read_text().strip()
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert key in (tmp_path / "up.log").read_text()  # the banner shows how to call it

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        reply = client.chat.completions.create(
            model="base", temperature=0, max_tokens=20,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in (reply.choices[0].message.content or "")
        generated = httpx.post(f"http://127.0.0.1:{port}/v1/generate",
                               headers={"Authorization": f"Bearer {key}"},
                               json={"prompt": "What is the capital of France?",
                                     "temperature": 0}, timeout=60).json()
        assert "Paris" in generated["text"]
        for name in ("engine", "gateway", "worker", "redis"):
            assert (data / "logs" / f"{name}.log").exists()
        records = sa.create_engine(database_url(data))
        assert migrate.status(records).at_head
        records.dispose()

        proc.send_signal(signal.SIGINT)  # Ctrl-C stops everything
        assert proc.wait(40) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
    finally:
        stop(proc)
        log.close()
