"""deploy/docker and deploy/compose.yaml without Docker: images run as a non-root user on
pinned bases and pinned requirements that resolve on PyPI, the gateway's set leaves torch out
(and the gateway runs without it), and the compose file names only what exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
REQUIREMENTS = {
    "gateway": "requirements-gateway.txt",
    "cpu": "requirements-cpu.txt",
    "vllm": "requirements-vllm.txt",
    "trainer-gpu": "requirements-trainer-gpu.txt",
}
HEAVY = {
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "gguf",
    "numpy",
    "vllm",
    "unsloth",
    "trl",
    "bitsandbytes",
    "datasets",
}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _requirements(name: str) -> list[str]:
    lines: list[str] = []
    for line in (DOCKER / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            lines += _requirements(line[3:].strip())
        elif line:
            lines.append(line)
    return lines


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_and_non_root(path: Path) -> None:
    ins = _instructions(path)
    (base,) = [rest for op, rest in ins if op == "FROM"]
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d", tag), base
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # The last USER comes after every RUN: nothing runs as root at run time.
    last_user = max(i for i, (op, _) in enumerate(ins) if op == "USER")
    assert all(i < last_user for i, (op, _) in enumerate(ins) if op == "RUN")
    for op, rest in ins:
        if op == "RUN":
            for spec in re.findall(r"pip install ([^&]*)", rest):
                for word in spec.split():
                    word = word.strip('"')
                    if (
                        word.startswith("-")
                        or word in (".", "/tmp/requirements.txt")
                        or word.startswith(("/tmp/", "http"))
                    ):
                        continue
                    assert "==" in word, f"{path.name}: unpinned {word}"
        if op == "COPY":
            for src in rest.split()[:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"


@pytest.mark.parametrize("name", REQUIREMENTS.values())
def test_requirements_are_pinned(name: str) -> None:
    for req in _requirements(name):
        assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[a-z,]+\])?==[0-9][^ ]*", req), req
    names = {re.split(r"[\[=]", r)[0].lower() for r in _requirements(name)}
    if name == REQUIREMENTS["gateway"]:
        assert not names & HEAVY


def _resolve(name: str) -> dict[str, str]:
    """pip's own resolver against the index (nothing installed: --dry-run)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            "-",
            "-r",
            str(DOCKER / name),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, f"{name} does not resolve:\n{out.stderr[-3000:]}"
    report = json.loads(out.stdout)
    return {
        i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
        for i in report["install"]
    }


def test_every_image_resolves() -> None:
    with ThreadPoolExecutor(len(REQUIREMENTS)) as pool:
        resolved = dict(zip(REQUIREMENTS, pool.map(_resolve, REQUIREMENTS.values()), strict=True))
    assert not set(resolved["gateway"]) & HEAVY, set(resolved["gateway"]) & HEAVY
    assert resolved["cpu"]["torch"].split("+")[0] == "2.13.0"
    assert resolved["vllm"]["vllm"] == "0.26.0"
    assert resolved["trainer-gpu"]["unsloth"] == "2026.10.9"
    # The image's tunegate deps (pyproject) are all there, at versions pyproject accepts.
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = dep.name.lower()
        if name in HEAVY:
            continue
        assert name in resolved["gateway"], f"gateway image lacks {name}"
        assert dep.specifier.contains(resolved["gateway"][name], prereleases=True), dep


def test_gateway_runs_without_torch(tmp_path: Path) -> None:
    """The gateway app starts and answers with the model stack made unimportable."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {sorted(HEAVY)!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from fastapi.testclient import TestClient
from gateway.app import create_app
from gateway.settings import GatewaySettings
app = create_app(GatewaySettings(engines=[], data_dir={str(tmp_path)!r}))
with TestClient(app) as c:
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 503
    assert c.get("/v1/models").status_code == 401
print("heavy modules:", sorted(m for m in sys.modules if m.split(".")[0] in {sorted(HEAVY)!r}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heavy modules: []" in out.stdout


def test_compose_names_only_what_exists() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = doc["services"]
    volumes = set(doc.get("volumes", {}))
    images_built = {s["image"] for s in services.values() if "build" in s and "image" in s}
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert "gpu" not in services[dep].get("profiles", []) or "gpu" in svc.get(
                "profiles", []
            ), f"{name} needs the gpu profile's {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in volumes, f"{name}: undeclared volume {src}"
        if "build" in svc:
            ctx = (ROOT / "deploy" / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file(), name
        elif not svc["image"].startswith(("redis:", "postgres:")):
            assert svc["image"] in images_built, f"{name}: image {svc['image']} is never built"
        cmd = svc.get("command", [])
        if cmd[:1] == ["tunegate"]:
            # The command and its options exist in this CLI (options are parsed before the
            # eager --help answers).
            out = subprocess.run(
                [sys.executable, "-m", "tunegate", *cmd[1:], "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert out.returncode == 0, (name, out.stderr[-500:])
        # Every ${VAR:?...} is required, so a missing secret stops compose instead of
        # starting with an empty password.
        text = json.dumps(svc)
        assert "${" not in text or all(":?" in m for m in re.findall(r"\$\{[^}]*\}", text))
