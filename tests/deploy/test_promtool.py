"""The alert rules through Prometheus' own tools (Debian's ``prometheus`` package, installed by
scripts/setup.sh): ``promtool check rules`` loads them, and ``promtool test rules`` runs the unit
tests in ``deploy/prometheus/alerts_test.yml``, where every alert fires on the series meant to
trip it and stays quiet on healthy ones (and before its ``for`` has elapsed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: scripts/setup.sh installs Debian's prometheus")
        pytest.skip("promtool is missing: run scripts/setup.sh (apt-get install prometheus)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=DIR, capture_output=True, text=True,
                          timeout=120)


def test_check_rules() -> None:
    out = run("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_unit_tests_pass() -> None:
    out = run("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load((DIR / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    cases: list[dict[str, Any]] = [c for t in yaml.safe_load(
        (DIR / "alerts_test.yml").read_text())["tests"] for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts - fires == set(), "alerts without a case where they fire"
    assert alerts - quiet == set(), "alerts without a case where they stay quiet"


def test_a_broken_rule_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n"
                   "        expr: sum(rate(foo[5m]) > \n")
    out = run("check", "rules", str(bad))
    assert out.returncode != 0
