"""The fuzz lane (see ``fuzz_lane``): every gateway operation, with a user key and an admin key,
valid and invalid inputs, against a real gateway process; no 5xx, no response outside the schema.

The engine behind it is the fake replica (``bench/fake_upstream.py``): the gateway is what is
fuzzed, and the fake answers in microseconds, so a couple of thousand cases fit in a minute or
two of CI time (the embedded engine would spend seconds of CPU per generated request).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.conftest import Records, gateway
from tests.security.fuzz_lane import fuzz

EXAMPLES = 12  # per operation, key and mode: about 2,000 cases in all


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path, redis_url: str) -> Iterator[str]:
    with gateway(data_dir, [engine], redis_url) as url:
        yield url


@pytest.mark.timeout(600)
def test_fuzz_every_operation(gw: str, records: Records) -> None:
    keys = {"user": records.key("user"), "admin": records.key("admin")}
    report = fuzz(gw, keys, max_examples=EXAMPLES)
    print(report.operations, report.cases, report.server_errors, report.schema_violations)
    print("\n".join(report.failures))
    assert report.operations >= 30
    assert report.cases >= 1500
    assert report.server_errors == 0, "\n".join(report.failures)
    assert report.schema_violations == 0, "\n".join(report.failures)
