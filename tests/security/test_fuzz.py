"""The fuzz lane (see ``fuzz_lane``): every gateway operation, with a user key and an admin key,
valid inputs (invalid ones in bench/abuse.py), against a real gateway process; no 5xx, no
response outside the schema.

The engine behind it is the fake replica (``bench/fake_upstream.py``): the gateway is what is
fuzzed, and the fake answers in microseconds, so a couple of thousand cases fit in a minute or
two of CI time (the embedded engine would spend seconds of CPU per generated request).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from schemathesis import GenerationMode

from tests.gateway.conftest import Records, gateway
from tests.security.fuzz_lane import fuzz

EXAMPLES = 30  # per operation and key (valid inputs): about 1,700 cases in all


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path, redis_url: str) -> Iterator[str]:
    with gateway(data_dir, [engine], redis_url) as url:
        yield url


@pytest.mark.timeout(600)
def test_fuzz_every_operation(gw: str, records: Records) -> None:
    keys = {"user": records.key("user"), "admin": records.key("admin")}
    # Invalid inputs are left to bench/abuse.py: schemathesis spends ~1 s of CPU per invalid
    # case (most drawn ones are rejected), too slow for the test run.
    report = fuzz(gw, keys, max_examples=EXAMPLES, modes=(GenerationMode.POSITIVE,))
    assert report.operations >= 30
    assert report.cases >= 1500
    assert report.server_errors == 0, "\n".join(report.failures)
    assert report.schema_violations == 0, "\n".join(report.failures)


def test_fuzz_findings_stay_fixed(gw: str, records: Records) -> None:
    """What the lane found: a limit too large for the database and the quota script, and NUL
    characters in names, were 500s."""
    admin = {"Authorization": f"Bearer {records.key('admin')}"}
    for body in ({"name": "k", "tpm": 31392070705515516603138048},
                 {"name": "k", "rpm": 10**13},
                 {"name": "k\x00", "models": ["base"]},
                 {"name": "k", "models": ["a\x00b"]}):
        r = httpx.post(gw + "/admin/keys", headers=admin, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
