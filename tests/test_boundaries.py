"""The import boundaries (pyproject.toml, ``[tool.importlinter]``) hold, and they can break."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(extra_path or cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_repository_keeps_its_import_contracts() -> None:
    got = lint(ROOT)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "0 broken" in got.stdout


def test_a_gateway_importing_torch_or_the_trainer_breaks_the_contracts(tmp_path: Path) -> None:
    """The same contracts over a small tree in which the gateway imports torch (inside a
    function, as heavy imports are written) and the trainer's worker."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for pkg in ("gateway", "engine", "engine/embedded", "engine/vllm", "trainer", "shared",
                "tunegate"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "trainer" / "worker.py").write_text("import shared\n")
    (tmp_path / "gateway" / "app.py").write_text(
        "import trainer.worker\n\n\ndef f():\n    import torch\n    return torch\n")
    got = lint(tmp_path)
    assert got.returncode != 0
    assert "gateway, engine and trainer are independent of each other BROKEN" in got.stdout
    assert "the gateway never imports torch, transformers, peft or vllm BROKEN" in got.stdout
