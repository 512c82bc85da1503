"""``run_parity`` and ``tunegate parity`` on the lane's two engines: 20 Rotten Tomatoes golden
reviews, a random adapter (r 8, q/v), greedy, CPU float32 on both sides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.parity import ParityReport, run_parity
from trainer.data_sources import write_splits

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, path = write_splits(tmp_path_factory.mktemp("golden"), n_train=2, n_golden=20)
    return path


def test_run_parity_agrees_on_first_tokens(golden: Path, embedded_url: str, vllm_url: str,
                                           lane_adapters: dict[str, Path]) -> None:
    report = run_parity(str(lane_adapters["a1"]), golden, embedded_url=embedded_url,
                        vllm_url=vllm_url, max_tokens=8)
    assert isinstance(report, ParityReport) and report.prompts == 20
    assert report.first_token_agreement >= 0.9
    assert 0 <= report.sequence_agreement <= report.first_token_agreement
    # Every prompt whose sequence differs is listed, and only those.
    assert len(report.disagreements) == round((1 - report.sequence_agreement) * 20)
    assert sum(not d.first_token_agrees for d in report.disagreements) == round(
        (1 - report.first_token_agreement) * 20)
    # The adapter was loaded for the comparison and unloaded after it, on both engines.
    for url in (embedded_url, vllm_url):
        ids = {c["id"] for c in httpx.get(url + "/v1/models").json()["data"]}
        assert not any(i.startswith("parity-") for i in ids)


def test_cli_writes_the_report(golden: Path, embedded_url: str, vllm_url: str,
                               tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate", "parity", "base", "--golden", str(golden),
         "--embedded-url", embedded_url, "--vllm-url", vllm_url, "--limit", "5",
         "--max-tokens", "4", "--min-first-token", "0.9", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "first token agreement" in proc.stdout
    report = json.loads(out.read_text())
    assert report["adapter"] == "base" and report["prompts"] == 5
    assert report["first_token_agreement"] >= 0.9


def test_cli_rejects_a_missing_golden_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tunegate", "parity", "base", "--golden",
         str(tmp_path / "none.jsonl"), "--embedded-url", "http://127.0.0.1:9",
         "--vllm-url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
