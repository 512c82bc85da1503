"""docs/configuration.md is what scripts/gen_config_docs.py makes from the settings classes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_matches_the_settings_classes() -> None:
    got = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr


def test_every_documented_class_and_the_variables_the_issue_names_are_there() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for var in ("TUNEGATE_DATA_DIR", "TUNEGATE_DATABASE_URL", "TUNEGATE_ARTIFACT_STORE_OPTIONS",
                "TUNEGATE_PROMOTION_CANARY_WEIGHT", "TUNEGATE_MONITOR_GATEWAY_URL",
                "TUNEGATE_ENGINE_REGISTER_INTERVAL_S", "TUNEGATE_GATEWAY_ENGINES",
                "TUNEGATE_TRAINER_QUEUE_NAME", "TUNEGATE_VLLM_LORA_FOLD",
                "TUNEGATE_VLLM_HOST_LORA_META_AB_FILE"):
        assert f"`{var}`" in text, var


def test_a_changed_default_is_drift(tmp_path: Path) -> None:
    """The check compares the whole file: an edited row fails it."""
    doc = ROOT / "docs" / "configuration.md"
    original = doc.read_text()
    try:
        doc.write_text(original.replace("| `8000` |", "| `8080` |", 1))
        got = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert got.returncode == 1 and "out of date" in got.stderr
    finally:
        doc.write_text(original)
